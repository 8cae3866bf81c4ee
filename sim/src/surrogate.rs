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
//! round. [`fit_device_rounds`] estimates the parameters from recorded real device-rounds
//! (`device_rounds.jsonl`, written by real-mode runs and `sim record`; see [`fit`] for the
//! estimation and the held-out validation) and writes them with their provenance; a parameter
//! file without provenance is refused unless forced ([`params`]). Time and memory use the real
//! model's cost model at the device's sparsity (MLP channels of the prunable blocks scaled down),
//! message sizes the real model's adapter at the same rank and sparsity.
//!
//! HetLoRA's rank self-pruning is not modelled: the surrogate has no adapter whose tail it
//! could measure, so its devices always report the rank they were sent and a `hetlora` run's
//! ranks stay its bandits' choices (only real mode shows the self-pruning).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use device_agent::cost::{self, MemoryMode, RoundCosts};
use device_agent::lora::HostFactors;
use device_agent::model::ModelConfig;
use device_agent::prune::{self, BlockScores, KeptIndicesExt, PruneConfig};
use device_agent::session::{AgentConfig, DeviceState, JobOutcome, TrainJob};
use device_agent::train::{RoundReport, StepRecord};
use protocol::{Buffer, GlobalSlice, Message, UpdateStats};
use protocol::{KeptIndices, Proj};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::compute::{pruned_config, LocalTrainer, Quality, ToTarget, TrainedRound};
use crate::sampling::standard_normal;
use crate::timing::{Clock, StepShape};

mod fit;
mod params;
pub use fit::{fit_device_rounds, fit_slice, predict, FitOptions};
pub use params::{Provenance, SurrogateParams, Validation};

/// The real model whose costs the surrogate reports (SmolLM2-135M).
pub fn real_model() -> ModelConfig {
    ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true)
}

/// The tiny model whose adapters travel through the coordinator in surrogate mode: four
/// blocks, all prunable, of 2 query heads sharing one KV head and 32 MLP channels. One channel
/// is 0.63% of its non-embedding parameters (the resolution of a surrogate device's sparsity);
/// its adapter is 704 numbers per rank, small enough that a device-round costs microseconds.
pub fn wire_model() -> ModelConfig {
    ModelConfig::dense(32, 8, 4, 2, 1, 4, 32, true)
}

/// The real model at non-embedding sparsity `s`: MLP channels of the prunable blocks (all but
/// the first and last) scaled down by the same count.
pub fn real_at_sparsity(real: &ModelConfig, s: f64) -> ModelConfig {
    real_at(real, real.dense_non_embedding_params(), s)
}

/// MLP channels each prunable block of `real` keeps at sparsity `s` (`dense`: its dense
/// non-embedding parameter count); `None` when nothing is pruned.
fn ffn_kept(real: &ModelConfig, dense: usize, s: f64) -> Option<usize> {
    let n = real.n_layers();
    if n <= 2 || s <= 0.0 {
        return None;
    }
    let per_channel = 3 * real.d_model;
    let want = s * dense as f64;
    let per_block = (want / (n - 2) as f64 / per_channel as f64).round() as usize;
    Some(real.ffn_dim.saturating_sub(per_block).max(32))
}

fn real_at(real: &ModelConfig, dense: usize, s: f64) -> ModelConfig {
    real_with_ffn(real, ffn_kept(real, dense, s))
}

/// `real` with `keep` MLP channels in each prunable block (`None`: dense).
fn real_with_ffn(real: &ModelConfig, keep: Option<usize>) -> ModelConfig {
    let mut c = real.clone();
    if let Some(keep) = keep {
        let n = c.n_layers();
        for b in c.blocks.iter_mut().take(n - 1).skip(1) {
            b.ffn_dim = keep;
        }
    }
    c
}

/// How a surrogate device sizes its rounds and messages: the real model at the sparsity of
/// its wire-model kept maps, and the real model's adapter payloads.
#[derive(Debug)]
pub struct SurrogateCosts {
    wire: ModelConfig,
    real: ModelConfig,
    /// `real`'s dense non-embedding parameter count (asked for every message and round).
    real_dense: usize,
    seq_len: usize,
    /// The real model at each MLP width a sparsity maps to, built once: a config is 31
    /// allocations, and every message, job and memory check asks for one (a quarter of the
    /// 10,000-device preset's allocations went to rebuilding them).
    real_by_width: Mutex<BTreeMap<Option<usize>, Arc<ModelConfig>>>,
}

impl SurrogateCosts {
    fn new(wire: ModelConfig, real: ModelConfig, seq_len: usize) -> Self {
        SurrogateCosts {
            wire,
            real_dense: real.dense_non_embedding_params(),
            real,
            seq_len,
            real_by_width: Mutex::new(BTreeMap::new()),
        }
    }

    fn wire_sparsity(&self, kept: &KeptIndices) -> f64 {
        kept.sparsity(&self.wire)
    }

    /// The real model at sparsity `s` (as [`real_at_sparsity`]), shared.
    fn real_at(&self, s: f64) -> Arc<ModelConfig> {
        let keep = ffn_kept(&self.real, self.real_dense, s);
        // A poisoned lock only means a panic elsewhere: the map holds finished entries.
        let mut built = self
            .real_by_width
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        built
            .entry(keep)
            .or_insert_with(|| Arc::new(real_with_ffn(&self.real, keep)))
            .clone()
    }

    /// The real model a device with `kept` wire-model maps stands for, shared.
    fn shared_shape(&self, kept: &KeptIndices) -> Arc<ModelConfig> {
        self.real_at(self.wire_sparsity(kept))
    }

    /// Bytes of a real-model adapter payload at `rank` for kept maps of wire sparsity `s`.
    fn real_payload_bytes(&self, rank: usize, s: f64, elem: usize) -> usize {
        let c = self.real_at(s);
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

impl RoundCosts for SurrogateCosts {
    fn shape(&self, kept: &KeptIndices) -> ModelConfig {
        self.shared_shape(kept).as_ref().clone()
    }

    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn round_memory(&self, kept: &KeptIndices, rank: usize, batch: usize, mode: MemoryMode) -> u64 {
        cost::train_memory_in(&self.shared_shape(kept), rank, batch, self.seq_len, mode).total
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
}

/// Local training answered by the fitted model.
pub struct SurrogateTrainer {
    pub params: SurrogateParams,
    costs: Arc<SurrogateCosts>,
    wire: ModelConfig,
    prune: PruneConfig,
    seq_len: usize,
    eval_tokens: usize,
    batch: usize,
    gap: f64,
    offsets: Vec<f64>,
    rng: ChaCha8Rng,
    /// Share of the gap each device's last local round closed.
    pending: BTreeMap<usize, f64>,
    clock: Arc<Clock>,
}

impl SurrogateTrainer {
    pub fn new(
        params: SurrogateParams,
        devices: usize,
        seq_len: usize,
        eval_tokens: usize,
        batch: usize,
        seed: u64,
        clock: Arc<Clock>,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5077_06a7e);
        let offsets = (0..devices)
            .map(|_| params.device_sd * standard_normal(&mut rng))
            .collect();
        let wire = wire_model();
        let prune = PruneConfig {
            protected_blocks: vec![],
            min_heads_per_block: 1,
            min_channels_per_block: 2,
            uniform: false,
            per_block: false,
            prune_heads: true,
        };
        SurrogateTrainer {
            gap: params.loss_initial - params.loss_floor,
            params,
            costs: Arc::new(SurrogateCosts::new(wire.clone(), real_model(), seq_len)),
            wire,
            prune,
            seq_len,
            eval_tokens,
            batch,
            offsets,
            rng,
            pending: BTreeMap::new(),
            clock,
        }
    }

    fn wire_sparsity(&self, kept: &KeptIndices) -> f64 {
        self.costs.wire_sparsity(kept)
    }

    /// Seeded random importance for the wire model's kept heads (and KV heads when asked; a
    /// round's pruning draws none, the bring-to-s* step does) and channels, block by block.
    fn random_scores(
        &self,
        kept: &KeptIndices,
        kv_heads: bool,
        rng: &mut ChaCha8Rng,
    ) -> Vec<BlockScores> {
        kept.shapes(&self.wire)
            .iter()
            .map(|s| BlockScores {
                heads: (0..s.n_heads).map(|_| rng.random()).collect(),
                kv_heads: if kv_heads {
                    (0..s.n_kv_heads).map(|_| rng.random()).collect()
                } else {
                    Vec::new()
                },
                channels: (0..s.ffn_dim).map(|_| rng.random()).collect(),
            })
            .collect()
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
                let a = uniform_draws(rank * din, sa, rng);
                let sb = per_layer / ((dout * rank).max(1) as f64).sqrt();
                let b = uniform_draws(dout * rank, sb, rng);
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
}

/// `n` independent draws of mean 0 and standard deviation `sd`, uniform on
/// `[-sqrt(3) sd, sqrt(3) sd]`: only the factors' scale matters to the surrogate (the loss comes
/// from the response model), and one 32-bit uniform per number costs a fraction of a normal.
fn uniform_draws(n: usize, sd: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let half_width = (3.0f64.sqrt() * sd) as f32;
    let scale = 2.0 * half_width / (1u64 << 32) as f32;
    // The generator's words in one bulk fill (the same words, in order, as `n` calls of
    // `next_u32`), turned into floats in place.
    let mut words = vec![0u32; n];
    rng.fill(&mut words[..]);
    words
        .into_iter()
        .map(|u| u as f32 * scale - half_width)
        .collect()
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

    fn cost_config(&self, kept: &KeptIndices) -> Arc<ModelConfig> {
        self.costs.shared_shape(kept)
    }

    fn costs(&self, _device: usize) -> Arc<dyn RoundCosts> {
        self.costs.clone()
    }

    fn clock(&self) -> &Clock {
        &self.clock
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
        let goal = job.sparsity_goal().round_target(s_prev);
        let kept = if goal > s_prev + 1e-12 {
            let scores = self.random_scores(&state.kept, false, &mut job_rng);
            prune::select_prune(&self.wire, &state.kept, &scores, goal, &self.prune)
        } else {
            state.kept.clone()
        };
        let s_new = self.wire_sparsity(&kept);
        // The two noise draws first (in this order), so the parameters are read in place.
        let (noise_pre, noise_post) = (self.noise(), self.noise());
        let p = &self.params;
        let phi = p.phi(rank as f64, steps as f64);
        let o = self.offsets.get(device).copied().unwrap_or(0.0);
        let loss_pre =
            (p.loss_floor + self.gap + p.sparsity_penalty * s_prev + o + noise_pre).max(0.01);
        let loss_post =
            (p.loss_floor + (1.0 - phi) * self.gap + p.sparsity_penalty * s_new + o + noise_post)
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
        let (pre, post) = (self.costs.real_at(s_prev), self.costs.real_at(s_new));
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
            peak_mem_bytes: cost::train_memory_in(&pre, rank, job.batch, self.seq_len, job.memory)
                .total,
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
        let flops = self.clock.round_flops_estimate(&pre, &post, shape, steps);
        let outcome = JobOutcome {
            round: job.round,
            kept,
            adapter: (rank, job.alpha, factors),
            importance: Default::default(),
            stats,
            report,
            metric_pre: p.accuracy(loss_pre),
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

    /// No model to score importance with: the wire model's kept maps are pruned to the target
    /// with seeded random scores under the surrogate's own pruning limits (the session's are
    /// the real model's: its protected blocks and 32-channel floor would leave the wire model
    /// nothing to prune), and the recovery is not modelled.
    fn evaluate_at_target(
        &mut self,
        device: usize,
        state: &DeviceState,
        slice: &GlobalSlice,
        goal: &ToTarget,
    ) -> Result<(Quality, KeptIndices), String> {
        let mut rng = ChaCha8Rng::seed_from_u64(goal.seed);
        let scores = self.random_scores(&state.kept, true, &mut rng);
        let kept = prune::select_prune(&self.wire, &state.kept, &scores, goal.target, &self.prune);
        let pruned = DeviceState {
            kept: kept.clone(),
            ..state.clone()
        };
        Ok((self.evaluate(device, &pruned, slice)?, kept))
    }

    fn wire_bytes(&self, msg: &Message, encoded_len: usize) -> usize {
        self.costs.wire_bytes(msg, encoded_len)
    }

    fn params_note(&self) -> Option<String> {
        Some(self.params.note())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_data::WorkloadKind;

    #[test]
    fn the_shipped_fit_loads_without_force_and_the_real_model_shrinks_with_sparsity() {
        // The shipped parameters carry their provenance and validation: no force needed.
        let cfg = crate::config::SurrogateConfig::default();
        let p = SurrogateParams::load(&cfg, WorkloadKind::Spam).unwrap();
        assert!(p.provenance.is_some() && p.validation.is_some());
        assert!(!p.perplexity, "fitted to the spam workload");
        // The SOTU workload gets its own fit, of perplexities.
        let sotu = SurrogateParams::load(&cfg, WorkloadKind::Sotu).unwrap();
        assert!(sotu.provenance.is_some() && sotu.validation.is_some());
        assert!(sotu.perplexity, "fitted to the SOTU workload");
        assert!(sotu.note().contains("sotu"), "{}", sotu.note());
        // More rank never closes less of the gap (the spam fit finds no rank effect: half = 0).
        assert!(p.phi(16.0, 10.0) >= p.phi(4.0, 10.0));
        let real = real_model();
        for s in [0.1, 0.3, 0.5] {
            let c = real_at_sparsity(&real, s);
            assert!((c.sparsity() - s).abs() < 0.01, "{s}: {}", c.sparsity());
        }
        assert_eq!(real_at_sparsity(&real, 0.0), real);
    }

    #[test]
    fn message_sizes_are_the_real_adapter_at_the_wire_models_sparsity() {
        let costs = SurrogateCosts::new(wire_model(), real_model(), 64);
        for s in [0.0, 0.1, 0.3, 0.5] {
            let c = real_at_sparsity(&real_model(), s);
            assert_eq!(*costs.real_at(s), c);
            // Counted the long way: every projection of every block at rank 8, f32, plus the
            // kept indices (4 bytes each) and 64 bytes of framing per layer.
            let mut numbers = 0;
            let mut kept = 0;
            for l in 0..c.n_layers() {
                for p in Proj::ALL {
                    let (din, dout) = device_agent::lora::proj_dims(&c, l, p);
                    numbers += 8 * (din + dout);
                }
                let b = &c.blocks[l];
                kept += b.n_heads + b.n_kv_heads + b.ffn_dim;
            }
            let want = numbers * 4 + kept * 4 + 64 * c.n_layers() * Proj::ALL.len();
            assert_eq!(costs.real_payload_bytes(8, s, 4), want, "s = {s}");
        }
        // The wire model itself: every block prunable, 704 adapter numbers per rank.
        let wire = wire_model();
        let per_rank: usize = (0..wire.n_layers())
            .flat_map(|l| Proj::ALL.map(|p| device_agent::lora::proj_dims(&wire, l, p)))
            .map(|(din, dout)| din + dout)
            .sum();
        assert_eq!(per_rank, 704);
    }
}
