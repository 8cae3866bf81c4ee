//! Surrogate mode: no model, a loss-response model fitted from recorded real runs, so bandit
//! policies can be tuned on tens of thousands of devices. Reports of surrogate runs say so.
//!
//! The coordinator and the sessions still run for real: updates are real adapter payloads of a
//! tiny *wire model* (so selection, slicing, aggregation, rewards and rejects are the real
//! code), while loss, time, memory and message sizes follow the real model:
//!
//! ```text
//! G_t          global gap above the floor, G_1 = loss_initial - loss_floor
//! phi(r, S)    = 1 - exp(-local_rate * S * r / (r + rank_half))     local share of the gap closed
//! L_pre(i)     = loss_floor + G_t + sparsity_penalty * s_prev + o_i + noise
//! L_post(i)    = loss_floor + (1 - phi) * G_t + sparsity_penalty * s_new + o_i + noise
//! G_{t+1}      = G_t * (1 - carry * mean phi over accepted updates)   (aggregated rounds)
//! accuracy     = accuracy_intercept + accuracy_slope * loss            (clamped to [0, 1])
//! |delta W|_F  = norm_per_gain * phi * G_t
//! ```
//!
//! `o_i ~ N(0, device_sd)` is fixed per device (non-IID data), `noise ~ N(0, noise_sd)` per
//! round. [`fit`] estimates the parameters from real runs' `rounds.jsonl` (per-update losses,
//! sparsities, ranks, steps, delta norms, and the panel evaluations): the sparsity penalty by
//! within-round regression, the floor, local rate and rank half-point by a grid search on the
//! updates' post-round losses, the carry-over from the round-to-round decay of the gap, and the
//! accuracy line from the evaluations. Time and memory use the real model's cost model at the
//! device's sparsity (MLP channels of the prunable blocks scaled down), message sizes the real
//! model's adapter at the same rank and sparsity.

use std::collections::BTreeMap;
use std::path::Path;

use device_agent::cost;
use device_agent::lora::HostFactors;
use device_agent::model::ModelConfig;
use device_agent::prune::{self, BlockScores, KeptIndicesExt, PruneConfig};
use device_agent::session::{AgentConfig, DeviceState, JobOutcome, TrainJob};
use device_agent::train::{RoundReport, StepRecord};
use protocol::{Buffer, GlobalSlice, KeptIndices, Message, Proj, UpdateStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::sampling::standard_normal;
use crate::timing::{self, StepShape};
use crate::trainer::{pruned_config, LocalTrainer, Quality, TrainedRound};

/// The fitted loss-response model (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurrogateParams {
    /// What the parameters were fitted from.
    pub source: String,
    pub loss_initial: f64,
    pub loss_floor: f64,
    pub local_rate: f64,
    pub rank_half: f64,
    pub sparsity_penalty: f64,
    pub carry: f64,
    pub device_sd: f64,
    pub noise_sd: f64,
    pub accuracy_intercept: f64,
    pub accuracy_slope: f64,
    pub norm_per_gain: f64,
    /// LM workload: report perplexity `exp(loss)`.
    pub perplexity: bool,
}

/// The built-in parameters, fitted from the default preset's real runs.
pub const BUILTIN_PARAMS: &str = include_str!("../configs/surrogate-params.toml");

impl SurrogateParams {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, SimError> {
        let p: SurrogateParams =
            toml::from_str(text).map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        p.validate()
            .map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        Ok(p)
    }

    /// The built-in fit, or a parameters file.
    pub fn load(path: &str) -> Result<Self, SimError> {
        if path.is_empty() {
            return Self::from_toml(BUILTIN_PARAMS, "built-in surrogate parameters");
        }
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), String> {
        let all = [
            self.loss_initial,
            self.loss_floor,
            self.local_rate,
            self.rank_half,
            self.sparsity_penalty,
            self.carry,
            self.device_sd,
            self.noise_sd,
            self.accuracy_intercept,
            self.accuracy_slope,
            self.norm_per_gain,
        ];
        if all.iter().any(|x| !x.is_finite()) {
            return Err("every parameter must be finite".into());
        }
        if !(self.loss_floor >= 0.0 && self.loss_initial > self.loss_floor) {
            return Err(format!(
                "need 0 <= loss_floor ({}) < loss_initial ({})",
                self.loss_floor, self.loss_initial
            ));
        }
        if self.local_rate <= 0.0
            || self.rank_half < 0.0
            || self.device_sd < 0.0
            || self.noise_sd < 0.0
            || self.norm_per_gain < 0.0
        {
            return Err(
                "local_rate must be positive; rank_half, device_sd, noise_sd, norm_per_gain >= 0"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.carry) {
            return Err(format!("carry {} must be in [0, 1]", self.carry));
        }
        Ok(())
    }

    /// Share of the gap one local round closes.
    pub fn phi(&self, rank: f64, steps: f64) -> f64 {
        1.0 - (-self.local_rate * steps * rank / (rank + self.rank_half)).exp()
    }

    pub fn accuracy(&self, loss: f64) -> f64 {
        (self.accuracy_intercept + self.accuracy_slope * loss).clamp(0.0, 1.0)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// The real model whose costs the surrogate reports (SmolLM2-135M).
pub fn real_model() -> ModelConfig {
    ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true)
}

/// The tiny model whose adapters travel through the coordinator in surrogate mode.
pub fn wire_model() -> ModelConfig {
    ModelConfig::dense(32, 16, 10, 4, 2, 4, 64, true)
}

/// The real model at non-embedding sparsity `s`: MLP channels of the prunable blocks (all but
/// the first and last) scaled down by the same count.
pub fn real_at_sparsity(real: &ModelConfig, s: f64) -> ModelConfig {
    let mut c = real.clone();
    let n = c.n_layers();
    if n <= 2 || s <= 0.0 {
        return c;
    }
    let per_channel = 3 * c.d_model;
    let want = s * c.dense_non_embedding_params() as f64;
    let per_block = (want / (n - 2) as f64 / per_channel as f64).round() as usize;
    let keep = c.ffn_dim.saturating_sub(per_block).max(32);
    for b in c.blocks.iter_mut().take(n - 1).skip(1) {
        b.ffn_dim = keep;
    }
    c
}

/// Local training answered by the fitted model.
pub struct SurrogateTrainer {
    pub params: SurrogateParams,
    wire: ModelConfig,
    real: ModelConfig,
    prune: PruneConfig,
    seq_len: usize,
    eval_tokens: usize,
    batch: usize,
    gap: f64,
    offsets: Vec<f64>,
    rng: ChaCha8Rng,
    /// Share of the gap each device's last local round closed.
    pending: BTreeMap<usize, f64>,
}

impl SurrogateTrainer {
    pub fn new(
        params: SurrogateParams,
        devices: usize,
        seq_len: usize,
        eval_tokens: usize,
        batch: usize,
        seed: u64,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5077_06a7e);
        let offsets = (0..devices)
            .map(|_| params.device_sd * standard_normal(&mut rng))
            .collect();
        let wire = wire_model();
        let prune = PruneConfig {
            protected_blocks: vec![0, wire.n_layers() - 1],
            min_heads_per_block: 1,
            min_channels_per_block: 4,
            uniform: false,
            prune_heads: true,
        };
        SurrogateTrainer {
            gap: params.loss_initial - params.loss_floor,
            params,
            wire,
            real: real_model(),
            prune,
            seq_len,
            eval_tokens,
            batch,
            offsets,
            rng,
            pending: BTreeMap::new(),
        }
    }

    fn wire_sparsity(&self, kept: &KeptIndices) -> f64 {
        pruned_config(&self.wire, kept).sparsity()
    }

    fn noise(&mut self) -> f64 {
        self.params.noise_sd * standard_normal(&mut self.rng)
    }

    /// Random adapter factors for `cfg` whose delta norm is about `norm` (B columns scaled).
    fn factors(
        cfg: &ModelConfig,
        rank: usize,
        alpha: f64,
        norm: f64,
        rng: &mut ChaCha8Rng,
    ) -> Vec<HostFactors> {
        let layers = cfg.n_layers() * Proj::ALL.len();
        let per_layer = norm / (layers as f64).sqrt() / (alpha / rank as f64);
        let mut out = Vec::with_capacity(layers);
        for l in 0..cfg.n_layers() {
            for p in Proj::ALL {
                let (din, dout) = device_agent::lora::proj_dims(cfg, l, p);
                let sa = 1.0 / (din.max(1) as f64).sqrt();
                let a = (0..rank * din)
                    .map(|_| (standard_normal(rng) * sa) as f32)
                    .collect();
                let sb = per_layer / ((dout * rank).max(1) as f64).sqrt();
                let b = (0..dout * rank)
                    .map(|_| (standard_normal(rng) * sb) as f32)
                    .collect();
                out.push(HostFactors {
                    block: l,
                    proj: p,
                    a,
                    b,
                    rows_out: dout,
                    cols_in: din,
                });
            }
        }
        out
    }

    /// Bytes of a real-model adapter payload at `rank` for kept maps of wire sparsity `s`.
    fn real_payload_bytes(&self, rank: usize, s: f64, elem: usize) -> usize {
        let c = real_at_sparsity(&self.real, s);
        let d = c.d_model;
        let hd = c.head_dim;
        let per_rank: usize = c
            .blocks
            .iter()
            .map(|b| {
                let (q, kv, f) = (b.n_heads * hd, b.n_kv_heads * hd, b.ffn_dim);
                (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
            })
            .sum();
        let kept: usize = c
            .blocks
            .iter()
            .map(|b| b.n_heads + b.n_kv_heads + b.ffn_dim)
            .sum::<usize>()
            * 4;
        rank * per_rank * elem + kept + 64 * c.n_layers() * Proj::ALL.len()
    }
}

fn elem_bytes(b: &Buffer) -> usize {
    match b {
        Buffer::F32(_) => 4,
        _ => 2,
    }
}

impl LocalTrainer for SurrogateTrainer {
    fn mode(&self) -> &'static str {
        "surrogate"
    }

    fn dense(&self) -> &ModelConfig {
        &self.wire
    }

    fn cost_config(&self, kept: &KeptIndices) -> ModelConfig {
        real_at_sparsity(&self.real, self.wire_sparsity(kept))
    }

    fn seq_len(&self, _device: usize) -> usize {
        self.seq_len
    }

    fn eval_tokens(&self, _device: usize) -> (usize, usize) {
        (self.eval_tokens, self.seq_len)
    }

    fn train(
        &mut self,
        device: usize,
        job: &TrainJob,
        state: &DeviceState,
        _agent: &AgentConfig,
    ) -> Result<TrainedRound, String> {
        let rank = job.arm.rank as usize;
        let steps = job.local_steps;
        let s_prev = self.wire_sparsity(&state.kept);
        let mut job_rng = ChaCha8Rng::seed_from_u64(job.seed);
        let kept = if job.arm.prune_ratio > s_prev + 1e-12 {
            let shapes = state.kept.shapes(&self.wire);
            let scores: Vec<BlockScores> = shapes
                .iter()
                .map(|s| BlockScores {
                    heads: (0..s.n_heads).map(|_| job_rng.random()).collect(),
                    channels: (0..s.ffn_dim).map(|_| job_rng.random()).collect(),
                })
                .collect();
            prune::select_prune(
                &self.wire,
                &state.kept,
                &scores,
                job.arm.prune_ratio,
                &self.prune,
            )
        } else {
            state.kept.clone()
        };
        let s_new = self.wire_sparsity(&kept);
        let p = self.params.clone();
        let phi = p.phi(rank as f64, steps as f64);
        let o = self.offsets.get(device).copied().unwrap_or(0.0);
        let loss_pre =
            (p.loss_floor + self.gap + p.sparsity_penalty * s_prev + o + self.noise()).max(0.01);
        let loss_post =
            (p.loss_floor + (1.0 - phi) * self.gap + p.sparsity_penalty * s_new + o + self.noise())
                .max(0.01);
        self.pending.insert(device, phi);
        let wire_cfg = pruned_config(&self.wire, &kept);
        let factors = Self::factors(
            &wire_cfg,
            rank,
            job.alpha,
            p.norm_per_gain * phi * self.gap,
            &mut job_rng,
        );
        let (pre, post) = (
            real_at_sparsity(&self.real, s_prev),
            real_at_sparsity(&self.real, s_new),
        );
        let params_pre = wire_cfg.non_embedding_params();
        let report = RoundReport {
            steps: (1..=steps)
                .map(|k| StepRecord {
                    step: k,
                    loss: loss_post,
                    accuracy: p.accuracy(loss_post),
                    lr: job.lr,
                    grad_norm: 0.0,
                    sparsity: s_new,
                    params: params_pre,
                })
                .collect(),
            sparsity_before: s_prev,
            sparsity_after: s_new,
            prune_events: if s_new > s_prev {
                vec![(steps / 2, s_new)]
            } else {
                vec![]
            },
        };
        let stats = UpdateStats {
            loss_pre: loss_pre as f32,
            loss_post: loss_post as f32,
            sparsity: s_new as f32,
            param_count: post.total_params() as u64,
            compute_ms: 0,
            bytes_down: 0,
            bytes_up: 0,
            peak_mem_bytes: cost::train_memory(&pre, rank, job.batch, self.seq_len).total,
            samples: (steps * job.batch) as u64,
            steps: steps as u32,
        };
        let shape = StepShape {
            rank,
            batch: job.batch.max(self.batch.min(job.batch)),
            seq: self.seq_len,
            eval_tokens: self.eval_tokens,
            eval_seq: self.seq_len,
        };
        let flops = timing::round_flops_estimate(&pre, &post, shape, steps);
        let outcome = JobOutcome {
            round: job.round,
            kept,
            adapter: (rank, job.alpha, factors),
            stats,
            report,
            metric_post: p.accuracy(loss_post),
        };
        Ok(TrainedRound { outcome, flops })
    }

    fn evaluate(
        &mut self,
        device: usize,
        state: &DeviceState,
        _slice: &GlobalSlice,
    ) -> Result<Quality, String> {
        let p = &self.params;
        let s = self.wire_sparsity(&state.kept);
        let o = self.offsets.get(device).copied().unwrap_or(0.0);
        let loss = (p.loss_floor + self.gap + p.sparsity_penalty * s + o).max(0.01);
        Ok(Quality {
            loss,
            accuracy: p.accuracy(loss),
            perplexity: p.perplexity.then(|| loss.exp()),
        })
    }

    fn wire_bytes(&self, msg: &Message, encoded_len: usize) -> usize {
        match msg {
            Message::Update(u) => {
                let s = self.wire_sparsity(&u.kept);
                let elem = u
                    .adapter
                    .layers
                    .first()
                    .map_or(4, |l| elem_bytes(&l.a.data));
                self.real_payload_bytes(u.adapter.rank as usize, s, elem) + 128
            }
            Message::RoundConfig(rc) => match &rc.global {
                Some(g) => {
                    let s = self.wire_sparsity(&g.kept);
                    let elem = g
                        .adapter
                        .layers
                        .first()
                        .map_or(4, |l| elem_bytes(&l.a.data));
                    // The slice and the kept maps it was cut for.
                    self.real_payload_bytes(g.adapter.rank as usize, s, elem) + 128
                }
                None => encoded_len,
            },
            _ => encoded_len,
        }
    }

    fn round_closed(&mut self, aggregated: bool, participants: &[(usize, f64)]) {
        if aggregated {
            let phis: Vec<f64> = participants
                .iter()
                .filter_map(|(d, _)| self.pending.get(d).copied())
                .collect();
            if !phis.is_empty() {
                let m = phis.iter().sum::<f64>() / phis.len() as f64;
                self.gap *= 1.0 - self.params.carry * m;
            }
        }
        self.pending.clear();
    }
}

/// The part of a `rounds.jsonl` line the fit reads.
#[derive(Debug, Clone, Deserialize)]
struct FitRound {
    aggregated: bool,
    plays: Vec<FitPlay>,
    eval: Option<FitEval>,
}

#[derive(Debug, Clone, Deserialize)]
struct FitPlay {
    rank: u32,
    outcome: String,
    loss_pre: Option<f64>,
    loss_post: Option<f64>,
    sparsity_prev: Option<f64>,
    sparsity: Option<f64>,
    delta_norm: Option<f64>,
    steps: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct FitEval {
    loss: f64,
    accuracy: f64,
    perplexity: Option<f64>,
}

/// One accepted update for the fit.
#[derive(Debug, Clone, Copy)]
struct Obs {
    s_prev: f64,
    s_new: f64,
    rank: f64,
    steps: f64,
    pre: f64,
    post: f64,
    norm: f64,
}

/// Fit parameters from real runs' `rounds.jsonl` files (see the module docs).
pub fn fit(files: &[&Path]) -> Result<SurrogateParams, SimError> {
    let mut runs: Vec<Vec<(bool, Vec<Obs>)>> = Vec::new();
    let mut evals: Vec<(f64, f64)> = Vec::new();
    let mut perplexity = false;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| SimError::io(*f, e))?;
        let mut run = Vec::new();
        for (k, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let r: FitRound = serde_json::from_str(line)
                .map_err(|e| SimError::Surrogate(format!("{}:{}: {e}", f.display(), k + 1)))?;
            if let Some(e) = &r.eval {
                evals.push((e.loss, e.accuracy));
                perplexity |= e.perplexity.is_some();
            }
            let obs: Vec<Obs> = r
                .plays
                .iter()
                .filter(|p| p.outcome == "accepted")
                .filter_map(|p| {
                    Some(Obs {
                        s_prev: p.sparsity_prev?,
                        s_new: p.sparsity?,
                        rank: p.rank as f64,
                        steps: p.steps? as f64,
                        pre: p.loss_pre?,
                        post: p.loss_post?,
                        norm: p.delta_norm.unwrap_or(0.0),
                    })
                })
                .collect();
            if !obs.is_empty() {
                run.push((r.aggregated, obs));
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    let n_obs: usize = runs.iter().flatten().map(|(_, o)| o.len()).sum();
    if n_obs < 4 {
        return Err(SimError::Surrogate(format!(
            "only {n_obs} accepted updates in the files; need at least 4"
        )));
    }
    // 1. Sparsity penalty: within-round regression of losses on sparsity.
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (_, obs) in runs.iter().flatten() {
        type Get = fn(&Obs) -> f64;
        let pairs: [(Get, Get); 2] = [(|o| o.s_prev, |o| o.pre), (|o| o.s_new, |o| o.post)];
        for (get_s, get_l) in pairs {
            let n = obs.len() as f64;
            let ms = obs.iter().map(get_s).sum::<f64>() / n;
            let ml = obs.iter().map(get_l).sum::<f64>() / n;
            for o in obs {
                sxy += (get_s(o) - ms) * (get_l(o) - ml);
                sxx += (get_s(o) - ms).powi(2);
            }
        }
    }
    let beta = if sxx > 1e-9 {
        (sxy / sxx).clamp(0.0, 10.0)
    } else {
        0.0
    };
    // Per-round means of sparsity-corrected pre-round losses.
    let round_pre =
        |obs: &[Obs]| obs.iter().map(|o| o.pre - beta * o.s_prev).sum::<f64>() / obs.len() as f64;
    let min_post = runs
        .iter()
        .flatten()
        .flat_map(|(_, o)| o.iter().map(|x| x.post - beta * x.s_new))
        .fold(f64::INFINITY, f64::min);
    let max_pre = runs
        .iter()
        .flatten()
        .map(|(_, o)| round_pre(o))
        .fold(f64::NEG_INFINITY, f64::max);
    // 2. Grid search: floor, local rate, rank half-point on post-round losses.
    let mut best: Option<(f64, f64, f64, f64)> = None;
    let floors: Vec<f64> = (0..40)
        .map(|k| min_post.max(0.0) * k as f64 / 40.0)
        .collect();
    let rates: Vec<f64> = (0..48)
        .map(|k| 10f64.powf(-4.0 + 4.0 * k as f64 / 47.0))
        .collect();
    let halves = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    for &floor in &floors {
        for &rate in &rates {
            for &half in &halves {
                let mut sse = 0.0;
                for (_, obs) in runs.iter().flatten() {
                    let g = (round_pre(obs) - floor).max(1e-6);
                    for o in obs {
                        let phi = 1.0 - (-rate * o.steps * o.rank / (o.rank + half)).exp();
                        let pred = floor + (1.0 - phi) * g;
                        sse += (o.post - beta * o.s_new - pred).powi(2);
                    }
                }
                if best.is_none_or(|b| sse < b.0) {
                    best = Some((sse, floor, rate, half));
                }
            }
        }
    }
    let (sse, floor, rate, half) = best.expect("non-empty grid");
    let phi = |o: &Obs| 1.0 - (-rate * o.steps * o.rank / (o.rank + half)).exp();
    // 3. Carry-over: G_{t+1} / G_t = 1 - carry * mean phi_t over aggregated rounds.
    let (mut num, mut den) = (0.0, 0.0);
    for run in &runs {
        for w in run.windows(2) {
            let (agg, obs) = (&w[0].0, &w[0].1);
            if !agg {
                continue;
            }
            let g0 = round_pre(obs) - floor;
            let g1 = round_pre(&w[1].1) - floor;
            if g0 <= 1e-6 {
                continue;
            }
            let m = obs.iter().map(phi).sum::<f64>() / obs.len() as f64;
            num += m * (1.0 - g1 / g0);
            den += m * m;
        }
    }
    let carry = if den > 0.0 {
        (num / den).clamp(0.0, 1.0)
    } else {
        0.5
    };
    let first = runs
        .iter()
        .filter_map(|r| r.first())
        .map(|(_, o)| round_pre(o))
        .sum::<f64>()
        / runs.len() as f64;
    // 4. Spreads: device offsets from the within-round spread of pre-round losses; round noise
    // from what the post-round fit leaves beyond that.
    let (mut dev_ss, mut dev_n) = (0.0, 0usize);
    for (_, obs) in runs.iter().flatten() {
        let m = round_pre(obs);
        for o in obs {
            dev_ss += (o.pre - beta * o.s_prev - m).powi(2);
            dev_n += 1;
        }
    }
    let device_sd = (dev_ss / dev_n.max(1) as f64).sqrt();
    let resid_sd = (sse / n_obs as f64).sqrt();
    let noise_sd = (resid_sd.powi(2) - device_sd.powi(2))
        .max(0.0)
        .sqrt()
        .max(0.1 * device_sd);
    // 5. Accuracy line from the panel evaluations.
    let (a, b) = if evals.len() >= 2 {
        let n = evals.len() as f64;
        let mx = evals.iter().map(|e| e.0).sum::<f64>() / n;
        let my = evals.iter().map(|e| e.1).sum::<f64>() / n;
        let sxx: f64 = evals.iter().map(|e| (e.0 - mx).powi(2)).sum();
        let sxy: f64 = evals.iter().map(|e| (e.0 - mx) * (e.1 - my)).sum();
        let b = if sxx > 1e-12 { sxy / sxx } else { 0.0 };
        (my - b * mx, b)
    } else {
        (evals.first().map_or(0.5, |e| e.1), 0.0)
    };
    // 6. Update norm per unit of gain (ratio of sums: robust to tiny gains).
    let (mut norms, mut gains) = (0.0, 0.0);
    for (_, obs) in runs.iter().flatten() {
        let g = (round_pre(obs) - floor).max(1e-6);
        for o in obs.iter().filter(|o| o.norm > 0.0) {
            norms += o.norm;
            gains += phi(o) * g;
        }
    }
    let params = SurrogateParams {
        source: format!(
            "fitted from {} file(s), {} accepted updates, {} evaluations; post-round loss RMSE {:.3}",
            files.len(),
            n_obs,
            evals.len(),
            resid_sd
        ),
        loss_initial: first.max(floor + 1e-3).min(max_pre.max(first)),
        loss_floor: floor,
        local_rate: rate,
        rank_half: half,
        sparsity_penalty: beta,
        carry,
        device_sd,
        noise_sd,
        accuracy_intercept: a,
        accuracy_slope: b,
        norm_per_gain: if gains > 1e-9 { norms / gains } else { 1.0 },
        perplexity,
    };
    params.validate().map_err(SimError::Surrogate)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parameters_load_and_the_real_model_shrinks_with_sparsity() {
        let p = SurrogateParams::load("").unwrap();
        assert!(p.phi(16.0, 10.0) > p.phi(4.0, 10.0));
        let real = real_model();
        for s in [0.1, 0.3, 0.5] {
            let c = real_at_sparsity(&real, s);
            assert!((c.sparsity() - s).abs() < 0.01, "{s}: {}", c.sparsity());
        }
        assert_eq!(real_at_sparsity(&real, 0.0), real);
    }

    #[test]
    fn the_fit_recovers_parameters_of_generated_rounds() {
        // Rounds generated by the model itself, without noise.
        let truth = SurrogateParams {
            source: String::new(),
            loss_initial: 3.0,
            loss_floor: 1.5,
            local_rate: 0.02,
            rank_half: 8.0,
            sparsity_penalty: 0.8,
            carry: 0.6,
            device_sd: 0.0,
            noise_sd: 0.0,
            accuracy_intercept: 0.9,
            accuracy_slope: -0.2,
            norm_per_gain: 2.0,
            perplexity: true,
        };
        let mut gap = truth.loss_initial - truth.loss_floor;
        let mut lines = String::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for round in 1..=12u64 {
            let mut plays = Vec::new();
            let mut phis = Vec::new();
            for _ in 0..6 {
                let rank = [4u32, 8, 16, 32][rng.random_range(0..4)];
                let s_prev: f64 = rng.random::<f64>() * 0.3;
                let s_new = s_prev + rng.random::<f64>() * 0.2;
                let phi = truth.phi(rank as f64, 10.0);
                phis.push(phi);
                let pre = truth.loss_floor + gap + truth.sparsity_penalty * s_prev;
                let post = truth.loss_floor + (1.0 - phi) * gap + truth.sparsity_penalty * s_new;
                plays.push(serde_json::json!({"rank": rank, "outcome": "accepted", "loss_pre": pre, "loss_post": post, "sparsity_prev": s_prev, "sparsity": s_new, "delta_norm": 2.0 * phi * gap, "steps": 10}));
            }
            let eval_loss = truth.loss_floor + gap;
            lines.push_str(&serde_json::json!({"round": round, "aggregated": true, "plays": plays, "eval": {"loss": eval_loss, "accuracy": truth.accuracy(eval_loss), "perplexity": eval_loss.exp()}}).to_string());
            lines.push('\n');
            gap *= 1.0 - truth.carry * phis.iter().sum::<f64>() / phis.len() as f64;
        }
        let dir = std::env::temp_dir().join(format!("fedspine-sim-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rounds.jsonl");
        std::fs::write(&path, lines).unwrap();
        let got = fit(&[path.as_path()]).unwrap();
        assert!((got.sparsity_penalty - 0.8).abs() < 0.05, "{got:?}");
        assert!((got.loss_initial - 3.0).abs() < 0.1, "{got:?}");
        assert!((got.carry - 0.6).abs() < 0.15, "{got:?}");
        assert!((got.accuracy_slope + 0.2).abs() < 0.01, "{got:?}");
        assert!(got.perplexity);
        // The fitted model predicts the post-round loss of a rank-16 round within 5%.
        let g = 1.5;
        let want = 1.5 + (1.0 - truth.phi(16.0, 10.0)) * g;
        let pred = got.loss_floor
            + (1.0 - got.phi(16.0, 10.0))
                * (got.loss_floor + g - got.loss_floor - (got.loss_floor - 1.5));
        assert!((pred / want - 1.0).abs() < 0.05, "{pred} vs {want}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
