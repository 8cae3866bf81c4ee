//! The time model: how long a device computes and how long a message travels, on the virtual
//! clock. Only time is modelled; the training itself is real.
//!
//! **Compute.** Each optimiser step of a local round is charged what the calibrated
//! per-operator model ([`crate::time_model`], fitted to the agent's own steps timed on a real
//! host: the shipped `sim/calibration/*.json`, or the file an experiment's `[clock] calibration`
//! names; see [`Clock`]) predicts for the step's shape, rank, batch and sequence length: a
//! pruned model does not get cheaper in proportion to its FLOPs, because the LM head,
//! per-step overhead and memory-bound operators do not shrink. Steps that still accumulate
//! importance for a pending prune are charged as such. Two held-out evaluations
//! (before and after) are charged as forward passes. The shape during a step is not recorded
//! per step, but its non-embedding parameter count is (`StepRecord::params`); the model is
//! affine in the kept units, so a step's cost is interpolated between the round's starting and
//! final shapes by that count. Costs are carried as *reference-equivalent FLOPs* (the FLOPs
//! the reference step does in the same host time, [`crate::time_model::REFERENCE`]), so a
//! device profile's `train_gflops` (its throughput on the reference step) turns them into time:
//! `ms = equivalent / (train_gflops * power_mode * draw)`, where `draw` is the device's
//! per-round speed factor from a truncated normal around 1. The FLOPs-linear model the
//! simulator used before is kept as [`round_flops_linear`] for comparison.
//!
//! **Transfer.** `bytes * 8 / rate + rtt`, with the rate of the direction's link (uplink for
//! device -> aggregator, downlink the other way); a link carries one message at a time, later
//! messages queue behind it. The aggregator's own link is assumed not to be the bottleneck.
//!
//! **Memory.** `cost::train_memory_in(shape at the round's start, arm rank, batch, seq, mode)`;
//! the round's start is its largest shape, since pruning only shrinks the model. A device keeps
//! activations when that fits its RAM, else recomputes blocks (slower by `step_cost_factor`);
//! a round runs out of memory only when neither mode fits.

use std::sync::{Arc, OnceLock};

use device_agent::cost::{self, MemoryMode};
use device_agent::model::ModelConfig;
use device_agent::train::RoundReport;

use crate::config::ClockConfig;
use crate::error::SimError;
use crate::time_model::{
    Calibration, ShapeSums, StepKind, TimeModel, Workload, BUILTIN_CALIBRATION,
};

/// The virtual clock's compute model: the per-operator time model fitted to one measurement
/// file, and where that file came from (reports name it).
#[derive(Debug, Clone)]
pub struct Clock {
    model: TimeModel,
    /// The file, the host it was measured on and the fit's leave-one-out error.
    pub source: String,
}

impl Clock {
    /// The clock fitted to `cal` (`origin` names the file).
    pub fn fit(cal: &Calibration, origin: &str) -> Result<Clock, SimError> {
        let model = TimeModel::fit(cal).map_err(|e| SimError::Config(e.to_string()))?;
        let errors: Vec<String> = [StepKind::Train, StepKind::Forward]
            .into_iter()
            .map(|kind| {
                let v = cal.validation(kind);
                format!("{} {:.1}%", kind.name(), 100.0 * v.ours().0)
            })
            .collect();
        let source = format!(
            "{origin} (measured on {}, {}; leave-one-out max error {})",
            cal.host.cpu,
            cal.host.date,
            errors.join(", ")
        );
        Ok(Clock { model, source })
    }

    /// The shipped calibration's clock (fitted once per process).
    pub fn builtin() -> Arc<Clock> {
        static CLOCK: OnceLock<Arc<Clock>> = OnceLock::new();
        CLOCK
            .get_or_init(|| {
                let (origin, text) = BUILTIN_CALIBRATION;
                let clock = Calibration::from_json(text, origin)
                    .map_err(|e| SimError::Config(e.to_string()))
                    .and_then(|c| Clock::fit(&c, origin));
                Arc::new(
                    clock.expect(
                        "the built-in calibration parses and fits (checked by a unit test)",
                    ),
                )
            })
            .clone()
    }

    /// The clock an experiment asks for: its `[clock] calibration` file (a `sim calibrate`
    /// output, read relative to the working directory), or the shipped one.
    pub fn load(cfg: &ClockConfig) -> Result<Arc<Clock>, SimError> {
        if cfg.calibration.is_empty() {
            return Ok(Clock::builtin());
        }
        let path = &cfg.calibration;
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        let cal = Calibration::from_json(&text, path)
            .map_err(|e| SimError::Config(format!("[clock] {e}")))?;
        Ok(Arc::new(Clock::fit(&cal, path)?))
    }

    /// The fitted time model.
    pub fn model(&self) -> &TimeModel {
        &self.model
    }

    /// Reference-equivalent FLOPs of one training step (`scoring`: while importance
    /// accumulates).
    pub fn train_step_flops(
        &self,
        cfg: &ModelConfig,
        rank: usize,
        batch: usize,
        seq: usize,
        scoring: bool,
    ) -> f64 {
        let kind = if scoring {
            StepKind::TrainScoring
        } else {
            StepKind::Train
        };
        self.model
            .equivalent_flops(kind, &workload(cfg, rank, batch, seq))
    }

    /// Reference-equivalent FLOPs of a forward pass over `tokens` tokens in sequences of `seq`
    /// with a rank-`rank` adapter (0: merged or none).
    pub fn forward_flops(&self, cfg: &ModelConfig, tokens: usize, seq: usize, rank: usize) -> f64 {
        let seq = seq.max(1);
        let batch = tokens.div_ceil(seq).max(1);
        self.model
            .equivalent_flops(StepKind::Forward, &workload(cfg, rank, batch, seq))
    }

    /// Reference-equivalent FLOPs of a round from its report, the starting and final shapes.
    pub fn round_flops(
        &self,
        pre: &ModelConfig,
        post: &ModelConfig,
        shape: StepShape,
        report: &RoundReport,
    ) -> RoundFlops {
        let (r, b, n) = (shape.rank, shape.batch, shape.seq);
        let cost = |cfg: &ModelConfig, scoring: bool| self.train_step_flops(cfg, r, b, n, scoring);
        let p_pre = pre.non_embedding_params() as f64;
        let p_post = post.non_embedding_params() as f64;
        // Steps before the round's last pruning event accumulate importance scores.
        let last_event = report.prune_events.last().map_or(0, |&(step, _)| step);
        let train = report
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let scoring = i < last_event;
                let (f_pre, f_post) = (cost(pre, scoring), cost(post, scoring));
                at_params((p_pre, f_pre), (p_post, f_post), s.params)
            })
            .sum();
        let eval = self.forward_flops(pre, shape.eval_tokens, shape.eval_seq, r)
            + self.forward_flops(post, shape.eval_tokens, shape.eval_seq, r);
        RoundFlops { train, eval }
    }

    /// Reference-equivalent FLOPs of a round when only the shapes are known (the surrogate):
    /// steps run at the average of the starting and final shapes' costs.
    pub fn round_flops_estimate(
        &self,
        pre: &ModelConfig,
        post: &ModelConfig,
        shape: StepShape,
        steps: usize,
    ) -> RoundFlops {
        let (r, b, n) = (shape.rank, shape.batch, shape.seq);
        let train = steps as f64
            * 0.5
            * (self.train_step_flops(pre, r, b, n, false)
                + self.train_step_flops(post, r, b, n, false));
        let eval = self.forward_flops(pre, shape.eval_tokens, shape.eval_seq, r)
            + self.forward_flops(post, shape.eval_tokens, shape.eval_seq, r);
        RoundFlops { train, eval }
    }

    /// Latency of one inference forward pass over `tokens` tokens (a prompt of that length,
    /// the adapter merged) on a device whose forward throughput at the forward reference is
    /// `infer_gflops`, in milliseconds (fractional).
    pub fn inference_ms(&self, cfg: &ModelConfig, tokens: usize, infer_gflops: f64) -> f64 {
        self.forward_flops(cfg, tokens, tokens, 0) / (infer_gflops * 1e9) * 1000.0
    }
}

fn workload(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> Workload {
    Workload {
        shape: ShapeSums::of(cfg),
        rank,
        batch,
        seq,
    }
}

/// FLOPs of one local round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundFlops {
    pub train: f64,
    pub eval: f64,
}

impl RoundFlops {
    pub fn total(&self) -> f64 {
        self.train + self.eval
    }

    /// The round's cost when its device trains in `mode`: recomputing blocks repeats their
    /// forward pass in every step.
    pub fn in_mode(self, mode: MemoryMode) -> RoundFlops {
        RoundFlops {
            train: self.train * step_cost_factor(mode),
            eval: self.eval,
        }
    }
}

/// Time of a training step in `mode` over its time keeping activations: 1.45 for block
/// recomputation (4.05 against 2.79 s per dense r16 b4 x s256 step, BENCHMARKS.md "The
/// allocator"; one host, one run).
pub fn step_cost_factor(mode: MemoryMode) -> f64 {
    match mode {
        MemoryMode::KeepActivations => 1.0,
        MemoryMode::RecomputeBlocks => 1.45,
    }
}

/// Shape of a round's workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
    /// Tokens scored by one held-out evaluation, and their sequence length.
    pub eval_tokens: usize,
    pub eval_seq: usize,
}

/// The FLOPs-linear round cost the simulator used before the calibrated model (every step's
/// analytic FLOPs, `cost::train_step_flops`, at the interpolated shape), for comparisons.
pub fn round_flops_linear(
    pre: &ModelConfig,
    post: &ModelConfig,
    shape: StepShape,
    report: &RoundReport,
) -> RoundFlops {
    let f_pre = cost::train_step_flops(pre, shape.rank, shape.batch, shape.seq);
    let f_post = cost::train_step_flops(post, shape.rank, shape.batch, shape.seq);
    let p_pre = pre.non_embedding_params() as f64;
    let p_post = post.non_embedding_params() as f64;
    let train = report
        .steps
        .iter()
        .map(|s| at_params((p_pre, f_pre), (p_post, f_post), s.params))
        .sum();
    let eval = cost::forward_flops(pre, shape.eval_tokens, shape.eval_seq, true)
        + cost::forward_flops(post, shape.eval_tokens, shape.eval_seq, true);
    RoundFlops { train, eval }
}

/// A step's cost at `params` non-embedding parameters, interpolated between the round's
/// starting `(params, cost)` and final one (the model is affine in the kept units).
fn at_params(pre: (f64, f64), post: (f64, f64), params: usize) -> f64 {
    let ((p_pre, f_pre), (p_post, f_post)) = (pre, post);
    if (p_pre - p_post).abs() < 0.5 {
        f_pre
    } else {
        let frac = ((params as f64 - p_post) / (p_pre - p_post)).clamp(0.0, 1.0);
        f_post + (f_pre - f_post) * frac
    }
}

/// Milliseconds to compute `flops` at `gflops` GFLOP/s (at least 1 ms).
pub fn compute_ms(flops: f64, gflops: f64) -> u64 {
    ((flops / (gflops * 1e9)) * 1000.0).ceil().max(1.0) as u64
}

/// Milliseconds to move `bytes` over a link of `mbps` Mbit/s with round-trip time `rtt_ms`.
pub fn transfer_ms(bytes: usize, mbps: f64, rtt_ms: f64) -> u64 {
    let serialise = bytes as f64 * 8.0 / (mbps * 1e6) * 1000.0;
    (serialise + rtt_ms).ceil() as u64
}

/// Peak training memory of a round that starts at `cfg` and trains in `mode`.
pub fn peak_memory(
    cfg: &ModelConfig,
    rank: usize,
    batch: usize,
    seq: usize,
    mode: MemoryMode,
) -> u64 {
    cost::train_memory_in(cfg, rank, batch, seq, mode).total
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_agent::train::StepRecord;

    fn report(params: &[usize]) -> RoundReport {
        RoundReport {
            steps: params
                .iter()
                .enumerate()
                .map(|(i, &p)| StepRecord {
                    step: i + 1,
                    loss: 1.0,
                    accuracy: 0.0,
                    lr: 1e-3,
                    grad_norm: 1.0,
                    sparsity: 0.0,
                    params: p,
                })
                .collect(),
            sparsity_before: 0.0,
            sparsity_after: 0.0,
            prune_events: vec![],
        }
    }

    fn smollm(ffn: usize) -> ModelConfig {
        let mut c = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        for b in c.blocks.iter_mut() {
            b.ffn_dim = ffn;
        }
        c
    }

    #[test]
    fn step_costs_follow_the_pruned_shape() {
        let (pre, post) = (smollm(1536), smollm(768));
        let shape = StepShape {
            rank: 8,
            batch: 2,
            seq: 128,
            eval_tokens: 256,
            eval_seq: 128,
        };
        let pp = pre.non_embedding_params();
        let pq = post.non_embedding_params();
        let clock = Clock::builtin();
        let f_pre = clock.train_step_flops(&pre, 8, 2, 128, false);
        let f_post = clock.train_step_flops(&post, 8, 2, 128, false);
        let round_flops = |pre: &ModelConfig, post: &ModelConfig, report: RoundReport| {
            clock.round_flops(pre, post, shape, &report)
        };
        // Two steps at the start shape, two at the end shape, no pruning event.
        let r = round_flops(&pre, &post, report(&[pp, pp, pq, pq]));
        assert!((r.train / (2.0 * (f_pre + f_post)) - 1.0).abs() < 1e-9);
        // A step half-way through the pruning costs the mean of the two.
        let mid = (pp + pq) / 2;
        let r = round_flops(&pre, &post, report(&[mid]));
        assert!((r.train / (0.5 * (f_pre + f_post)) - 1.0).abs() < 1e-3);
        // No pruning: every step at the dense shape.
        let r = round_flops(&pre, &pre, report(&[pp, pp, pp]));
        assert!((r.train / (3.0 * f_pre) - 1.0).abs() < 1e-9);
        assert!(r.eval > 0.0);
        // Halving the MLP saves less time than FLOPs: the head and overheads do not shrink.
        let flops_ratio =
            cost::train_step_flops(&post, 8, 2, 128) / cost::train_step_flops(&pre, 8, 2, 128);
        assert!(
            f_post / f_pre > flops_ratio,
            "{} vs {flops_ratio}",
            f_post / f_pre
        );
        assert!(f_post < f_pre);
    }

    #[test]
    fn the_reference_step_costs_its_flops_and_the_builtin_calibration_fits() {
        let clock = Clock::builtin();
        let m = clock.model();
        let (rank, batch, seq) = crate::time_model::REFERENCE;
        let dense = smollm(1536);
        let eq = clock.train_step_flops(&dense, rank, batch, seq, false);
        let flops = cost::train_step_flops(&dense, rank, batch, seq);
        assert!((eq / flops - 1.0).abs() < 1e-9, "{eq} vs {flops}");
        assert!(m.reference_gflops() > 1.0 && m.reference_forward_gflops() > 1.0);
        assert!(
            clock.source.starts_with(BUILTIN_CALIBRATION.0) && clock.source.contains("max error"),
            "{}",
            clock.source
        );
    }

    /// The shipped measurement points, every one timed at `ms` (a host where only a fixed
    /// cost per call counts), written to a file.
    fn flat_calibration(dir: &std::path::Path, ms: f64) -> String {
        let mut cal = Calibration::from_json(BUILTIN_CALIBRATION.1, "shipped").unwrap();
        for m in &mut cal.measurements {
            m.ms = ms;
        }
        let path = dir.join("calibration.json");
        std::fs::write(&path, serde_json::to_string(&cal).unwrap()).unwrap();
        path.display().to_string()
    }

    #[test]
    fn an_experiment_charges_the_calibration_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (pre, post) = (smollm(1536), smollm(768));
        let builtin = Clock::builtin();
        let share = |c: &Clock| {
            c.train_step_flops(&post, 8, 2, 128, false) / c.train_step_flops(&pre, 8, 2, 128, false)
        };
        // On the shipped host halving the MLP saves time; on a host where every call costs the
        // same it saves none, and a pruned step is charged the dense step's work.
        assert!(share(&builtin) < 0.9, "{}", share(&builtin));
        let path = flat_calibration(dir.path(), 250.0);
        let clock = Clock::load(&ClockConfig {
            calibration: path.clone(),
        })
        .unwrap();
        assert!(clock.source.starts_with(&path), "{}", clock.source);
        assert!((share(&clock) - 1.0).abs() < 1e-6, "{}", share(&clock));
        // Whatever the shape, a step costs the reference step's FLOPs there.
        let (rank, batch, seq) = crate::time_model::REFERENCE;
        let reference = cost::train_step_flops(&pre, rank, batch, seq);
        let tiny = ModelConfig::dense(256, 32, 2, 2, 1, 16, 64, true);
        let eq = clock.train_step_flops(&tiny, 2, 1, 16, false);
        assert!((eq / reference - 1.0).abs() < 1e-6, "{eq} vs {reference}");
        assert!(builtin.train_step_flops(&tiny, 2, 1, 16, false) < 0.5 * reference);
        // The default is the shipped file.
        let same = Clock::load(&ClockConfig::default()).unwrap();
        assert_eq!(same.source, builtin.source);
    }

    #[test]
    fn a_missing_or_malformed_calibration_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere.json").display().to_string();
        let load = |calibration: &str| {
            Clock::load(&ClockConfig {
                calibration: calibration.to_string(),
            })
        };
        let err = load(&missing).unwrap_err();
        assert!(err.to_string().contains(&missing), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"host\": 3}").unwrap();
        let bad = bad.display().to_string();
        let err = load(&bad).unwrap_err();
        assert!(
            err.to_string().contains(&bad) && err.to_string().contains("[clock]"),
            "{err}"
        );
        // A file whose times are not all positive is refused, not fitted.
        let path = flat_calibration(dir.path(), -1.0);
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("time"), "{err}");
    }

    #[test]
    fn transfers_and_compute_in_milliseconds() {
        // 1 MB at 8 Mbit/s is one second, plus the round trip.
        assert_eq!(transfer_ms(1_000_000, 8.0, 20.0), 1020);
        assert_eq!(compute_ms(2e9, 1.0), 2000);
        assert_eq!(compute_ms(0.0, 1.0), 1);
    }
}
