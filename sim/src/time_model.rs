//! The calibrated time model: how long one training step or one forward pass takes at a given
//! pruned shape, LoRA rank, batch and sequence length, fitted to measurements taken on a real
//! host (`sim calibrate`, which runs the device agent's own training step on the real model).
//!
//! A step's time is a non-negative combination of per-operator quantities of the shape:
//!
//! ```text
//! t = c0                      per-step overhead (scheduling, optimiser, bookkeeping)
//!   + c1 * F_block            FLOPs of the seven block projections (shrink with pruning)
//!   + c2 * F_head             FLOPs of the LM head (never pruned)
//!   + c3 * F_attn             FLOPs of QK^T and AV (quadratic in the sequence)
//!   + c4 * F_lora             FLOPs of the LoRA factors (skinny matmuls, low efficiency)
//!   + c5 * E_act              activation elements written and read by element-wise operators
//!   + c6 * W                  weights a pass reads once, whatever its token count (blocks and
//!                             the tied LM head; shrink with pruning; dominate small batches)
//!   + c7 * H_seq              (sequence, query head) pairs: attention runs as one small
//!                             matmul, softmax and matmul per pair, with a cost per pair that
//!                             does not scale with its length (dispatch, packing); removing a
//!                             head removes it, which is why head pruning saves more per FLOP
//!                             than channel pruning on short passes
//!   + c8 * F_in_place         FLOPs of the block and head products of a pass with fewer rows
//!                             (batch x sequence) than the agent's in-place threshold
//!                             (`device_agent::kernels::sgemm::IN_PLACE_BELOW_ROWS`, recorded
//!                             in the file as `in_place_below_rows`): those products read the
//!                             frozen weights where they lie instead of packing them, so such a
//!                             pass pays neither `c6 W` nor `c1`/`c2`'s efficiency but one of
//!                             its own; `F_block`, `F_head` and `W` are zero there. Files
//!                             without the field (measured before the in-place kernels, or on
//!                             a CPU without them) never take this term.
//! ```
//!
//! (The attention probabilities' element-wise work, `T n H` elements, is proportional to the
//! attention FLOPs and lands in `c3`.)
//!
//! with one coefficient vector per kind of work (training step, forward pass); a training step
//! that also accumulates importance for a pending prune costs a fitted factor times a plain
//! one. The quantities are forward-pass counts; a training step's
//! backward work is proportional to them and lands in the coefficients. Coefficients are fitted
//! by non-negative least squares on relative error (every point counts alike whatever its
//! size), validated by leave-one-out: each measured point is predicted by a fit to all the
//! others. The model the simulator used before, time linear in total FLOPs, is fitted and
//! validated the same way beside it ([`Validation::flops_linear`]).
//!
//! A device class scales the host model by one factor: the profile's `train_gflops` is its
//! sustained throughput on the reference shape ([`REFERENCE`]), so a device's time for any shape
//! is the host's time for that shape times `host throughput at the reference / device
//! throughput`. The host's shape-dependence (what shrinks with pruning and what does not) is
//! assumed to carry over to the device; the memory-bound share may differ on boards with other
//! bandwidth-to-compute ratios, which is what a sensitivity run varies.

mod fit;
pub mod grid;
mod table;

use serde::{Deserialize, Serialize};

use device_agent::cost;
use device_agent::model::ModelConfig;

pub use fit::{nnls, Validation};
pub use table::markdown;

/// What was timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// One optimiser step (forward, backward into the LoRA factors, update).
    Train,
    /// One optimiser step that also accumulates importance scores for a pending prune.
    TrainScoring,
    /// One forward pass with the adapter and the loss (a held-out evaluation batch).
    Forward,
}

impl StepKind {
    pub const ALL: [StepKind; 3] = [StepKind::Train, StepKind::TrainScoring, StepKind::Forward];

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Train => "train",
            StepKind::TrainScoring => "train_scoring",
            StepKind::Forward => "forward",
        }
    }
}

/// The parts of a (possibly pruned) model shape the time depends on: every quantity of the
/// model is linear in these per-model sums.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShapeSums {
    pub vocab: usize,
    pub d_model: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// Query heads kept, summed over blocks.
    pub heads: usize,
    /// KV heads kept, summed over blocks.
    pub kv_heads: usize,
    /// MLP channels kept, summed over blocks.
    pub channels: usize,
}

impl ShapeSums {
    pub fn of(cfg: &ModelConfig) -> ShapeSums {
        ShapeSums {
            vocab: cfg.vocab_size,
            d_model: cfg.d_model,
            head_dim: cfg.head_dim,
            layers: cfg.blocks.len(),
            heads: cfg.blocks.iter().map(|b| b.n_heads).sum(),
            kv_heads: cfg.blocks.iter().map(|b| b.n_kv_heads).sum(),
            channels: cfg.blocks.iter().map(|b| b.ffn_dim).sum(),
        }
    }
}

/// A step's workload: shape, rank and batch geometry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub shape: ShapeSums,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
}

/// Number of per-operator quantities (the length of [`features`]).
pub const N_FEATURES: usize = 9;
/// Fewest points of a kind that are fitted (one more than the coefficients, so leave-one-out
/// is defined). Training steps and forward passes must have them; scoring steps need only one
/// (they set a factor on the training step, [`TimeModel::scoring_factor`]).
pub const MIN_POINTS: usize = N_FEATURES + 1;
/// Their names, in order.
pub const FEATURE_NAMES: [&str; N_FEATURES] = [
    "overhead (ms)",
    "block GFLOP",
    "LM-head GFLOP",
    "attention GFLOP",
    "LoRA GFLOP",
    "activation M-elements",
    "weight M-params",
    "k head-sequences",
    "in-place GFLOP",
];

/// The per-operator quantities of one forward pass over `w` (GFLOP and millions of elements;
/// the first is the constant 1 of the overhead term) on a host whose products read the weights
/// in place below `in_place_below` rows (`None`: every product packs them).
pub fn features(w: &Workload, in_place_below: Option<usize>) -> [f64; N_FEATURES] {
    let s = &w.shape;
    let t = (w.batch * w.seq) as f64;
    let d = s.d_model as f64;
    let hd = s.head_dim as f64;
    let (h, kv, ch) = (s.heads as f64, s.kv_heads as f64, s.channels as f64);
    let r = w.rank as f64;
    let n = w.seq as f64;
    let l = s.layers as f64;
    let block = 2.0 * t * d * (2.0 * h * hd + 2.0 * kv * hd) + 2.0 * t * 3.0 * d * ch;
    let head = 2.0 * t * d * s.vocab as f64;
    let attn = 2.0 * 2.0 * t * h * hd * (n + 1.0) / 2.0;
    // (in + out) of the seven adapted projections, summed over blocks.
    let io = l * 7.0 * d + 2.0 * h * hd + 2.0 * kv * hd + 3.0 * ch;
    let lora = 2.0 * t * r * io;
    let act = t * (4.0 * d * l + 2.0 * h * hd + 2.0 * kv * hd + 4.0 * ch);
    // Weights a pass reads once whatever the token count (blocks and the tied LM head): what
    // small batches pay for, and what pruning shrinks.
    let weights = d * (2.0 * h * hd + 2.0 * kv * hd) + 3.0 * d * ch + d * s.vocab as f64;
    let in_place = in_place_below.is_some_and(|rows| w.batch * w.seq < rows);
    let (packed, read_in_place) = if in_place { (0.0, 1.0) } else { (1.0, 0.0) };
    [
        1.0,
        packed * block * 1e-9,
        packed * head * 1e-9,
        attn * 1e-9,
        lora * 1e-9,
        act * 1e-6,
        packed * weights * 1e-6,
        h * w.batch as f64 * 1e-3,
        read_in_place * (block + head) * 1e-9,
    ]
}

/// Total FLOPs of the work, as the FLOPs-linear model counts them (`cost`'s formulas: a
/// training step is two forward passes plus three LoRA forward passes).
pub fn total_flops(kind: StepKind, cfg_sums: &Workload) -> f64 {
    let f = features(cfg_sums, None);
    let forward = (f[1] + f[2] + f[3]) * 1e9;
    let lora = f[4] * 1e9;
    match kind {
        StepKind::Train | StepKind::TrainScoring => 2.0 * forward + 3.0 * lora,
        StepKind::Forward => forward + lora,
    }
}

/// The shipped calibration: (file, its text).
pub const BUILTIN_CALIBRATION: (&str, &str) = (
    "sim/calibration/amd-epyc-zen4-avx512.json",
    include_str!("../calibration/amd-epyc-zen4-avx512.json"),
);

/// The reference shape a profile's `train_gflops` describes: the dense model, rank 8, two
/// sequences of 128 tokens, a plain training step.
pub const REFERENCE: (usize, usize, usize) = (8, 2, 128);
/// The reference a profile's `infer_gflops` describes: one 128-token prompt through the dense
/// model (rank 8 adapter), a forward pass.
pub const REFERENCE_FORWARD: (usize, usize, usize) = (8, 1, 128);

/// One timed point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub kind: StepKind,
    /// How the shape was pruned (`dense`, `channels`, `heads+channels`) and to what sparsity.
    pub label: String,
    pub sparsity: f64,
    pub workload: Workload,
    /// Wall time, milliseconds: the fastest of `reps` timed calls (files written before
    /// 2026-12-01 hold the median).
    pub ms: f64,
    /// Timed calls the time is taken over (after one warm-up each run).
    pub reps: usize,
}

impl Measurement {
    /// Whether `other` timed the same work (kind, shape, rank and geometry).
    pub fn same_point(&self, other: &Measurement) -> bool {
        self.kind == other.kind
            && self.label == other.label
            && self.sparsity.to_bits() == other.sparsity.to_bits()
            && self.workload == other.workload
    }
}

/// Where and how a measurement file was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasuredOn {
    /// CPU model name.
    pub cpu: String,
    /// Instruction sets the kernels could use (`avx512f`, `avx2`, `fma`, `neon`).
    pub isa: Vec<String>,
    pub threads: usize,
    /// Build profile of the measuring binary.
    pub build: String,
    pub command: String,
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    /// The CPU class as a comparison's `host.json` names it (family and model, the kernels'
    /// paths); files written before 2026-12-05 leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<crate::host::HostInfo>,
    /// Rows (batch x sequence) below which the measuring agent's fp32 products read the frozen
    /// weights in place (the model's `F_in_place` term); `None` where it had no such kernels
    /// (files written before 2026-12-07 leave it out; those measured since 2026-12-05 with
    /// the in-place kernels may have it added by hand, as their commands record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_place_below_rows: Option<usize>,
}

/// A measurement file as `sim calibrate` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub host: MeasuredOn,
    pub measurements: Vec<Measurement>,
}

/// Why a calibration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TimeModelError {
    #[error("calibration {origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("calibration grid: {0}")]
    Grid(String),
    #[error("calibration {origin}: not a measurement file: {source}")]
    Parse {
        origin: String,
        source: serde_json::Error,
    },
}

impl Calibration {
    /// Parse and check a measurement file (`origin` names it in errors).
    pub fn from_json(text: &str, origin: &str) -> Result<Calibration, TimeModelError> {
        let c: Calibration =
            serde_json::from_str(text).map_err(|source| TimeModelError::Parse {
                origin: origin.to_string(),
                source,
            })?;
        let bad = |reason: String| TimeModelError::Invalid {
            origin: origin.to_string(),
            reason,
        };
        for (i, m) in c.measurements.iter().enumerate() {
            let w = &m.workload;
            if !(m.ms.is_finite() && m.ms > 0.0) {
                return Err(bad(format!("measurement {i}: time {} ms", m.ms)));
            }
            if w.batch == 0 || w.seq == 0 || w.shape.layers == 0 || w.shape.d_model == 0 {
                return Err(bad(format!("measurement {i}: empty workload {w:?}")));
            }
            if w.seq > 1 << 20 || w.batch > 1 << 16 || w.rank > 1 << 16 {
                return Err(bad(format!("measurement {i}: workload out of range {w:?}")));
            }
        }
        for kind in [StepKind::Train, StepKind::Forward] {
            let n = c.of_kind(kind).len();
            if n < MIN_POINTS {
                return Err(bad(format!(
                    "{n} {} points: at least {MIN_POINTS} are needed to fit and validate",
                    kind.name()
                )));
            }
        }
        Ok(c)
    }

    /// Several calibration runs of one host merged point by point: each point's time is the
    /// fastest over the runs that measured it and its `reps` their sum. The work is
    /// deterministic, so a slower time is interference; on a shared 2-core host a fastest of 7
    /// calls within one run still kept some (two runs disagreed by up to 10% on single points).
    /// Runs from different CPUs or builds are refused; `runs` pairs each with its origin.
    pub fn fastest_of(runs: &[(String, Calibration)]) -> Result<Calibration, TimeModelError> {
        let mut merged = Self::same_host(runs)?.clone();
        for (_, run) in &runs[1..] {
            for m in &run.measurements {
                match merged.measurements.iter_mut().find(|x| x.same_point(m)) {
                    Some(x) => {
                        x.ms = x.ms.min(m.ms);
                        x.reps += m.reps;
                    }
                    None => merged.measurements.push(m.clone()),
                }
            }
            merged.host.date = merged.host.date.clone().max(run.host.date.clone());
        }
        merged.host.command = Self::merged_command("fastest per point", runs);
        Ok(merged)
    }

    /// Several runs of one host merged point by point after each run is scaled to one speed:
    /// run `i`'s scale is the median over the points it shares with the first run of its time
    /// over the first run's, every time is divided by its run's scale and multiplied by the
    /// smallest scale, and each point keeps the median of its scaled times (`reps` summed). A
    /// VM whose speed drifts between runs (session 39's host: one run 1.19x slower throughout)
    /// then contributes its shape, which is what the clock reads, and a point that one run
    /// caught unusually fast or slow is outvoted; [`Calibration::fastest_of`] keeps such a
    /// point and adds nothing from a run that was slower throughout. Runs from different CPUs
    /// or builds are refused; points only some runs measured keep the median of those.
    pub fn scaled_median_of(runs: &[(String, Calibration)]) -> Result<Calibration, TimeModelError> {
        let first = Self::same_host(runs)?;
        // Never empty where it is called.
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            crate::stats::quantile(&v, 0.5).unwrap_or(f64::NAN)
        };
        let mut scales = Vec::with_capacity(runs.len());
        for (origin, run) in runs {
            let ratios: Vec<f64> = run
                .measurements
                .iter()
                .filter_map(|m| {
                    let f = first.measurements.iter().find(|x| x.same_point(m))?;
                    Some(m.ms / f.ms)
                })
                .collect();
            if ratios.is_empty() {
                return Err(TimeModelError::Invalid {
                    origin: origin.clone(),
                    reason: "no point in common with the first run to scale it by".into(),
                });
            }
            scales.push(median(ratios));
        }
        let fastest = scales.iter().copied().fold(f64::INFINITY, f64::min);
        let mut merged = first.clone();
        merged.measurements.clear();
        for (_, run) in runs {
            for m in &run.measurements {
                if !merged.measurements.iter().any(|x| x.same_point(m)) {
                    merged.measurements.push(m.clone());
                }
            }
        }
        for x in &mut merged.measurements {
            let mut times = Vec::new();
            let mut reps = 0;
            for ((_, run), scale) in runs.iter().zip(&scales) {
                if let Some(m) = run.measurements.iter().find(|m| m.same_point(x)) {
                    times.push(m.ms / scale * fastest);
                    reps += m.reps;
                }
            }
            x.ms = median(times);
            x.reps = reps;
        }
        for (_, run) in runs {
            merged.host.date = merged.host.date.clone().max(run.host.date.clone());
        }
        let scales: Vec<String> = scales.iter().map(|s| format!("{s:.3}")).collect();
        merged.host.command = Self::merged_command(
            &format!(
                "median per point, each run scaled to the fastest (scales {})",
                scales.join(", ")
            ),
            runs,
        );
        Ok(merged)
    }

    /// The first run, once every run is known to come from its host and build.
    fn same_host(runs: &[(String, Calibration)]) -> Result<&Calibration, TimeModelError> {
        let Some((first_origin, first)) = runs.first() else {
            return Err(TimeModelError::Invalid {
                origin: "merge".into(),
                reason: "no calibration to merge".into(),
            });
        };
        let same = |a: &MeasuredOn, b: &MeasuredOn| {
            let class = match (&a.class, &b.class) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
            a.cpu == b.cpu
                && a.isa == b.isa
                && a.threads == b.threads
                && a.build == b.build
                && a.in_place_below_rows == b.in_place_below_rows
                && class
        };
        for (origin, run) in &runs[1..] {
            if !same(&run.host, &first.host) {
                return Err(TimeModelError::Invalid {
                    origin: origin.clone(),
                    reason: format!(
                        "measured on {} ({}, {} threads, {} build), not on the host of {first_origin} ({}, {} threads, {} build)",
                        run.host.cpu, run.host.isa.join(","), run.host.threads, run.host.build,
                        first.host.cpu, first.host.threads, first.host.build
                    ),
                });
            }
        }
        Ok(first)
    }

    /// A merged file's `command`: how it was merged and every run's own command.
    fn merged_command(how: &str, runs: &[(String, Calibration)]) -> String {
        format!(
            "{how} of {} runs: {}",
            runs.len(),
            runs.iter()
                .map(|(o, c)| format!("{o} ({})", c.host.command))
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    pub fn of_kind(&self, kind: StepKind) -> Vec<&Measurement> {
        self.measurements
            .iter()
            .filter(|m| m.kind == kind)
            .collect()
    }

    /// Leave-one-out validation of the points of `kind` (scoring steps: the training fit times
    /// the other scoring points' factor), under this file's in-place threshold.
    pub fn validation(&self, kind: StepKind) -> Validation {
        let in_place = self.host.in_place_below_rows;
        match kind {
            StepKind::TrainScoring => Validation::leave_one_out_scoring(
                &self.of_kind(StepKind::Train),
                &self.of_kind(kind),
                in_place,
            ),
            _ => Validation::leave_one_out(kind, &self.of_kind(kind), in_place),
        }
    }
}

/// Fitted coefficients for training steps and forward passes, and the cost of accumulating
/// importance as a factor on a training step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimeModel {
    /// `(kind, coefficients)` for training steps and forward passes.
    pub coefficients: Vec<(StepKind, [f64; N_FEATURES])>,
    /// A step that accumulates importance costs this many plain training steps of the same
    /// workload (the mean ratio over the measured scoring points; 1 without any). A factor,
    /// not a fit of its own: the grid measures scoring steps at one batch geometry only, where
    /// separate coefficients are not identifiable and extrapolate badly.
    pub scoring_factor: f64,
    /// Host milliseconds of a training step at [`REFERENCE`] on the calibration's model shape.
    pub reference_ms: f64,
    /// FLOPs of that step.
    pub reference_flops: f64,
    /// Host milliseconds and FLOPs of the forward pass at [`REFERENCE_FORWARD`].
    pub reference_forward_ms: f64,
    pub reference_forward_flops: f64,
    /// The calibration's in-place threshold ([`MeasuredOn::in_place_below_rows`]).
    pub in_place_below_rows: Option<usize>,
}

impl TimeModel {
    /// Fit training steps and forward passes (each with at least [`MIN_POINTS`] points; a
    /// missing forward fit falls back to the training step's) and the scoring factor.
    pub fn fit(cal: &Calibration) -> Result<TimeModel, TimeModelError> {
        let in_place = cal.host.in_place_below_rows;
        let mut coefficients = Vec::new();
        for kind in [StepKind::Train, StepKind::Forward] {
            let pts = cal.of_kind(kind);
            if pts.len() < MIN_POINTS {
                continue;
            }
            coefficients.push((kind, fit::fit_points(&pts, in_place)));
        }
        let train = coefficients
            .first()
            .map(|(_, c)| *c)
            .unwrap_or([0.0; N_FEATURES]);
        let scoring_factor =
            fit::scoring_factor(&train, &cal.of_kind(StepKind::TrainScoring), in_place);
        let dense = cal
            .measurements
            .iter()
            .find(|m| m.sparsity == 0.0)
            .map(|m| m.workload.shape)
            .ok_or_else(|| TimeModelError::Invalid {
                origin: cal.host.command.clone(),
                reason: "no dense point to take the reference shape from".into(),
            })?;
        let at = |(rank, batch, seq): (usize, usize, usize)| Workload {
            shape: dense,
            rank,
            batch,
            seq,
        };
        let (train, forward) = (at(REFERENCE), at(REFERENCE_FORWARD));
        let mut m = TimeModel {
            coefficients,
            scoring_factor,
            reference_ms: 0.0,
            reference_flops: total_flops(StepKind::Train, &train),
            reference_forward_ms: 0.0,
            reference_forward_flops: total_flops(StepKind::Forward, &forward),
            in_place_below_rows: in_place,
        };
        m.reference_ms = m.host_ms(StepKind::Train, &train);
        m.reference_forward_ms = m.host_ms(StepKind::Forward, &forward);
        if !(m.reference_ms > 0.0 && m.reference_forward_ms > 0.0) {
            return Err(TimeModelError::Invalid {
                origin: cal.host.command.clone(),
                reason: "the fit predicts no time for the reference step".into(),
            });
        }
        Ok(m)
    }

    fn coefs(&self, kind: StepKind) -> &[f64; N_FEATURES] {
        let find = |k: StepKind| self.coefficients.iter().find(|(c, _)| *c == k);
        let kind = if kind == StepKind::TrainScoring {
            StepKind::Train
        } else {
            kind
        };
        let hit = find(kind)
            .or_else(|| find(StepKind::Train))
            .or_else(|| self.coefficients.first());
        match hit {
            Some((_, c)) => c,
            None => &[0.0; N_FEATURES],
        }
    }

    /// Predicted host milliseconds of one step of `kind` on `w`.
    pub fn host_ms(&self, kind: StepKind, w: &Workload) -> f64 {
        let f = features(w, self.in_place_below_rows);
        let t: f64 = self.coefs(kind).iter().zip(f).map(|(c, x)| c * x).sum();
        if kind == StepKind::TrainScoring {
            t * self.scoring_factor
        } else {
            t
        }
    }

    /// Host throughput at the reference shape, GFLOP/s.
    pub fn reference_gflops(&self) -> f64 {
        self.reference_flops / (self.reference_ms * 1e-3) * 1e-9
    }

    /// Host forward throughput at the forward reference, GFLOP/s.
    pub fn reference_forward_gflops(&self) -> f64 {
        self.reference_forward_flops / (self.reference_forward_ms * 1e-3) * 1e-9
    }

    /// The work of one step of `kind` on `w` in reference-equivalent FLOPs: the FLOPs the
    /// reference step (training or forward, by `kind`) does in the same host time. A device
    /// computes it in `equivalent / device_gflops` seconds, whatever its shape.
    pub fn equivalent_flops(&self, kind: StepKind, w: &Workload) -> f64 {
        let rate = match kind {
            StepKind::Forward => self.reference_forward_gflops(),
            StepKind::Train | StepKind::TrainScoring => self.reference_gflops(),
        };
        self.host_ms(kind, w) * 1e-3 * rate * 1e9
    }

    /// Milliseconds of one step of `kind` on `w` on a device whose sustained throughput at the
    /// reference shape is `device_gflops`.
    pub fn device_ms(&self, kind: StepKind, w: &Workload, device_gflops: f64) -> f64 {
        self.equivalent_flops(kind, w) / (device_gflops * 1e9) * 1e3
    }

    /// The same for a model config.
    pub fn device_ms_for(
        &self,
        kind: StepKind,
        cfg: &ModelConfig,
        rank: usize,
        batch: usize,
        seq: usize,
        device_gflops: f64,
    ) -> f64 {
        let w = Workload {
            shape: ShapeSums::of(cfg),
            rank,
            batch,
            seq,
        };
        self.device_ms(kind, &w, device_gflops)
    }
}

/// The FLOPs the simulator's old model charges for a training step (kept for comparisons).
pub fn flops_linear_train(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> f64 {
    cost::train_step_flops(cfg, rank, batch, seq)
}

#[cfg(test)]
mod tests;
