//! Prune-and-tune on one device: LoRA fine-tuning (Adam on the adapter only, AdamW when
//! weight decay is set; warm-up + cosine learning rate, global-norm clipping, gradient
//! accumulation) interleaved with gradual structured pruning toward a sparsity target,
//! guided by an importance EMA that the device carries from round to round.
//!
//! The loss ([`loss`]) is computed in row chunks straight from the final hidden states, and
//! its gradient with respect to them by hand, so the `[tokens, vocab]` logits never enter the
//! autodiff graph; the graph then runs backward from `sum(h * dL/dh)` through the decoder into
//! the LoRA factors. [`schedule`] says when the learning rate changes and when pruning happens;
//! `adamw` is the optimiser; this file holds the settings and the [`Tuner`], whose state is the
//! sliced model, the kept maps, the adapter, its optimiser moments and the importance EMA.

mod adamw;
pub mod loss;
pub mod rank_prune;
pub mod schedule;

use burn::tensor::Tensor;
use protocol::{KeptIndices, Proj};
use serde::{Deserialize, Serialize};

use crate::kernels::{self, Along};
use crate::lora::{Adapter, LoraFactors};
use crate::model::Llama;
use crate::prune::{self, BlockScores, Criterion, HeldModel, Importance, PruneConfig, PruneError};

pub use adamw::{check_weight_decay, optimiser_name};
pub use loss::{chunked_ce, Batch, StepStats};
pub use rank_prune::SelfPruned;
pub use schedule::{event_targets, lr_at, prune_schedule, prune_window, PruneShape};

/// Optimiser and schedule settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainConfig {
    pub lr: f64,
    /// Decoupled weight decay (AdamW: `w -= lr * weight_decay * w` beside the Adam step);
    /// default 0, which makes the optimiser plain Adam. Must be finite, at least 0, and
    /// `lr * weight_decay < 1`.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Warm-up steps (linear from 0), then cosine decay to `min_lr_ratio * lr`.
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (0 disables).
    pub clip_norm: f64,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Importance EMA factor (`I = lambda * I_prev + (1 - lambda) * I_now`, bias-corrected).
    pub ema_lambda: f64,
    /// The longest interval, in optimiser steps, between pruning events (the paper's K).
    pub prune_every: usize,
    /// The fewest pruning events a round's gap is spread over, when its pruning window has
    /// that many steps (see [`schedule`]).
    pub min_prune_events: usize,
    /// How the gap is spread over the events.
    pub prune_shape: PruneShape,
    pub criterion: Criterion,
    pub prune: PruneConfig,
    pub seed: u64,
    /// Recompute cheap activations in the backward pass instead of keeping them (burn's
    /// balanced gradient checkpointing): less memory for a little more compute.
    pub checkpointing: bool,
    /// Keep only each block's input during the forward pass and rebuild one block's graph at
    /// a time in the backward pass (about one extra forward of compute; peak activation
    /// memory of one block instead of all of them). For devices with little RAM.
    pub recompute_blocks: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 5,
            min_lr_ratio: 0.1,
            clip_norm: 1.0,
            grad_accum: 1,
            ema_lambda: 0.9,
            prune_every: 20,
            min_prune_events: 8,
            prune_shape: PruneShape::Cubic,
            criterion: Criterion::LoraGradient,
            prune: PruneConfig::default(),
            seed: 0,
            checkpointing: false,
            recompute_blocks: false,
        }
    }
}

/// Flat index of a factor: `(block * 7 + proj) * 2 + (0 for a, 1 for b)`.
fn fidx(l: usize, p: Proj, is_a: bool) -> usize {
    (l * 7 + p.index()) * 2 + usize::from(!is_a)
}

/// A device's prune-and-tune state: the sliced model, kept maps, adapter, optimiser moments,
/// accumulated gradients and the importance EMA.
pub struct Tuner {
    pub model: Llama,
    pub kept: KeptIndices,
    pub adapter: Adapter,
    pub cfg: TrainConfig,
    /// Optimiser steps taken.
    pub step: usize,
    moments: Vec<(Tensor<2>, Tensor<2>)>,
    accum: Vec<Option<Tensor<2>>>,
    accum_micro: usize,
    accum_stats: StepStats,
    /// Importance EMA (per kept unit, local order); carried across rounds by the device
    /// ([`Tuner::with_importance`], then read back from here).
    pub importance: Importance,
    rng: rand_chacha::ChaCha8Rng,
    /// HetLoRA's rank self-pruning ([`rank_prune`]); `None` (the default) leaves training as
    /// it is.
    rank_pruning: Option<protocol::RankPruning>,
    /// With bf16 products, the LM head rounded and packed for the loss, once per tuner rather
    /// than once per micro-batch (the head is the frozen embedding, which pruning never
    /// narrows); built at the first micro-batch.
    packed_head: Option<crate::bf16::PackedHead>,
}

/// A record of one optimiser step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub sparsity: f64,
    pub params: usize,
}

impl Tuner {
    /// Start from a copy of the dense base sliced to `kept`, with an adapter already shaped to
    /// those maps (the base stays as it is: the simulator's devices share one).
    pub fn new(
        base: &Llama,
        kept: KeptIndices,
        adapter: Adapter,
        cfg: TrainConfig,
    ) -> Result<Self, PruneError> {
        Ok(Self::holding(HeldModel::sliced(base, &kept)?, adapter, cfg))
    }

    /// Start from a model a device holds, taking it over: pruning then narrows it in place
    /// ([`prune::narrow`]), so no dense copy stays resident beside it. Hand it back with
    /// [`Tuner::into_held`].
    pub fn holding(held: HeldModel, adapter: Adapter, cfg: TrainConfig) -> Self {
        let (model, kept) = held.into_parts();
        let n = model.config.n_layers() * 14;
        let mut moments = Vec::with_capacity(n);
        for blk in &adapter.blocks {
            for f in blk {
                moments.push((f.a.zeros_like(), f.a.zeros_like()));
                moments.push((f.b.zeros_like(), f.b.zeros_like()));
            }
        }
        let rng = prune::scores_rng(cfg.seed);
        Tuner {
            model,
            kept,
            adapter,
            cfg,
            step: 0,
            moments,
            accum: vec![None; n],
            accum_micro: 0,
            accum_stats: StepStats::default(),
            importance: Importance::default(),
            rng,
            rank_pruning: None,
            packed_head: None,
        }
    }

    /// The model, sliced to the kept maps training and pruning left it at.
    pub fn into_held(self) -> HeldModel {
        HeldModel::from_parts(self.model, self.kept)
    }

    /// Continue the importance EMA a device carried from earlier rounds (it must match the
    /// kept maps this tuner started from).
    pub fn with_importance(mut self, importance: Importance) -> Result<Self, PruneError> {
        importance.check(&self.kept)?;
        self.importance = importance;
        Ok(self)
    }

    /// The bias-corrected importance estimate, or `None` before any sample.
    pub fn scores(&self) -> Option<Vec<BlockScores>> {
        self.importance.estimate(self.cfg.ema_lambda)
    }

    pub fn sparsity(&self) -> f64 {
        self.model.config.sparsity()
    }

    /// Forward and backward on one micro-batch; gradients accumulate until an optimiser step.
    /// With `importance`, the Taylor criterion's base-weight gradients are taken too.
    fn micro(
        &mut self,
        batch: &Batch,
        norm: f64,
        want_scores: bool,
    ) -> (StepStats, Option<Vec<BlockScores>>) {
        let taylor = want_scores && self.cfg.criterion == Criterion::Taylor;
        if self.packed_head.is_none() {
            self.packed_head = self.model.bf16_head(true);
        }
        let strategy = if self.cfg.checkpointing {
            burn::tensor::GradientCheckpointingStrategy::Balanced
        } else {
            burn::tensor::GradientCheckpointingStrategy::Disabled
        };
        let leaf = |t: &Tensor<2>| {
            t.clone()
                .autodiff()
                .with_gradient_checkpointing_strategy(strategy)
                .require_grad()
        };
        let leaves = Adapter {
            rank: self.adapter.rank,
            alpha: self.adapter.alpha,
            blocks: self
                .adapter
                .blocks
                .iter()
                .map(|b| {
                    b.iter()
                        .map(|f| LoraFactors {
                            a: leaf(&f.a),
                            b: leaf(&f.b),
                        })
                        .collect()
                })
                .collect(),
        };
        let mut model_ref = &self.model;
        let tracked;
        if taylor {
            assert!(
                self.model.quant_base().is_none(),
                "Taylor importance needs the base's weight gradients: an fp32 base"
            );
            let mut m = self.model.clone();
            for b in &mut m.blocks {
                for p in Proj::ALL {
                    let w = leaf(b.weight(p));
                    *b.weight_mut(p) = w;
                }
            }
            tracked = m;
            model_ref = &tracked;
        }
        let hd = self.model.config.head_dim;
        let n_layers = self.model.blocks.len();
        let mut block_grads: Vec<Option<burn::tensor::Gradients>> = Vec::new();
        // The loss and its gradient with respect to the final hidden rows (outside the graph).
        let loss = |h: &Tensor<2>| {
            chunked_ce(
                &self.model,
                h.clone().inner(),
                &batch.targets,
                norm,
                self.packed_head.as_ref(),
            )
        };
        let (nll, correct) = if self.cfg.recompute_blocks {
            // Block-wise recomputation: a plain forward keeps only each block's input; the
            // backward then rebuilds one block's graph at a time from its input and the
            // gradient flowing into its output, so at most one block's activations live.
            let [bsz, seq] = [batch.tokens.len(), batch.tokens.first().map_or(0, Vec::len)];
            let mut xs = Vec::with_capacity(n_layers);
            let mut x = self
                .model
                .embed_tokens(self.model.tokens_tensor(&batch.tokens));
            for l in 0..n_layers {
                xs.push(x.clone());
                x = self
                    .model
                    .block_forward(l, x, Some(&self.adapter), None, 0, bsz, seq);
            }
            let x_leaf = leaf(&x);
            let h = self.model.final_norm(x_leaf.clone());
            let (nll, correct, dh) = loss(&h);
            let grads = (h * dh).sum().backward();
            let mut dx = x_leaf
                .grad(&grads)
                .expect("final hidden state has a gradient");
            block_grads.resize_with(n_layers, || None);
            for l in (0..n_layers).rev() {
                let xin = leaf(&xs[l]);
                let out = model_ref.block_forward(l, xin.clone(), Some(&leaves), None, 0, bsz, seq);
                let grads = (out * dx).sum().backward();
                dx = xin.grad(&grads).expect("block input has a gradient");
                block_grads[l] = Some(grads);
            }
            (nll, correct)
        } else {
            let tokens = self.model.tokens_tensor(&batch.tokens);
            let h = model_ref.hidden(tokens, Some(&leaves), None);
            let (nll, correct, dh) = loss(&h);
            let grads = (h * dh).sum().backward();
            block_grads = (0..n_layers).map(|_| None).collect();
            block_grads[0] = Some(grads);
            (nll, correct)
        };
        // With one graph, every block's gradients live in the first entry.
        let grads_of = |l: usize| -> &burn::tensor::Gradients {
            block_grads[l]
                .as_ref()
                .or(block_grads[0].as_ref())
                .expect("block 0 always records its gradients, so the fallback is present")
        };
        for (l, blk) in leaves.blocks.iter().enumerate() {
            for (&p, f) in Proj::ALL.iter().zip(blk) {
                for (is_a, t) in [(true, &f.a), (false, &f.b)] {
                    let g = t.grad(grads_of(l)).expect("LoRA factor has a gradient");
                    let slot = &mut self.accum[fidx(l, p, is_a)];
                    *slot = Some(match slot.take() {
                        Some(acc) => acc + g,
                        None => g,
                    });
                }
            }
        }
        let scores = if taylor {
            Some(
                model_ref
                    .blocks
                    .iter()
                    .enumerate()
                    .map(|(l, b)| {
                        let i = |p: Proj| {
                            let w = b.weight(p);
                            let g = w.grad(grads_of(l)).expect("tracked weight has a gradient");
                            (w.clone().inner() * g).abs()
                        };
                        prune::group_scores(i, hd)
                    })
                    .collect(),
            )
        } else {
            None
        };
        let n = batch.n_targets();
        (
            StepStats {
                loss: if n > 0 { nll / n as f64 } else { 0.0 },
                targets: n,
                correct,
            },
            scores,
        )
    }

    /// LoRA-gradient importance from the accumulated gradients (before the update): on flex in
    /// one pass over each frozen weight ([`kernels::lora_importance`]), elsewhere composed from
    /// burn's operations.
    fn lora_scores(&self) -> Vec<BlockScores> {
        let s = self.adapter.scale();
        let hd = self.model.config.head_dim;
        let grad = |l: usize, p: Proj, is_a: bool| {
            self.accum[fidx(l, p, is_a)].clone().expect(
                "every LoRA factor is an autodiff leaf, so a backward pass accumulated its gradient",
            )
        };
        (0..self.model.blocks.len())
            .map(|l| {
                let sum = |p: Proj, along: Along| {
                    let f = &self.adapter.blocks[l][p.index()];
                    let (da, db) = (grad(l, p, true), grad(l, p, false));
                    let w0 = self.model.base_weight(l, p);
                    if let Some(t) =
                        kernels::lora_importance(&w0, &f.a, &f.b, &da, &db, s as f32, along)
                    {
                        return t;
                    }
                    let g = (da.clone().matmul(f.b.clone()) + f.a.clone().matmul(db.clone())
                        - da.matmul(db))
                    .mul_scalar(s);
                    let w = w0 + f.a.clone().matmul(f.b.clone()).mul_scalar(s);
                    prune::sum_along((g * w).abs(), along)
                };
                prune::group_sums(sum, hd)
            })
            .collect()
    }

    fn update_ema(&mut self, now: Vec<BlockScores>) {
        self.importance.update(now, self.cfg.ema_lambda);
    }

    /// Run one micro-batch; when `grad_accum` micro-batches have been seen, take an optimiser
    /// step at learning rate `lr` and return its record. With `track_importance`, the
    /// criterion's per-step scores (LoRA-gradient, Taylor) are folded into the EMA.
    pub fn train_micro(
        &mut self,
        batch: &Batch,
        lr: f64,
        track_importance: bool,
    ) -> Option<StepRecord> {
        let accum = self.cfg.grad_accum.max(1);
        // Normalise by the targets of this micro-batch times the accumulation count, so the
        // accumulated gradient is the mean over the optimiser step.
        let norm = (batch.n_targets().max(1) * accum) as f64;
        let (st, taylor_scores) =
            crate::backend::on_pool(|| self.micro(batch, norm, track_importance));
        self.accum_stats.loss += st.loss * st.targets as f64;
        self.accum_stats.targets += st.targets;
        self.accum_stats.correct += st.correct;
        if let Some(s) = taylor_scores {
            self.update_ema(s);
        }
        self.accum_micro += 1;
        if self.accum_micro < accum {
            return None;
        }
        if track_importance && self.cfg.criterion == Criterion::LoraGradient {
            let s = self.lora_scores();
            self.update_ema(s);
        }
        if let Some(rp) = &self.rank_pruning {
            rank_prune::add_tail_gradients(&self.adapter, &mut self.accum, rp);
        }
        let grad_norm = self.apply_optimiser(lr);
        let stats = std::mem::take(&mut self.accum_stats);
        self.accum_micro = 0;
        self.step += 1;
        Some(StepRecord {
            step: self.step,
            loss: stats.loss / stats.targets.max(1) as f64,
            accuracy: stats.correct as f64 / stats.targets.max(1) as f64,
            lr,
            grad_norm,
            sparsity: self.sparsity(),
            params: self.model.config.non_embedding_params(),
        })
    }

    /// Clip and apply the optimiser to every factor; returns the pre-clip global gradient norm.
    fn apply_optimiser(&mut self, lr: f64) -> f64 {
        let grads: Vec<Tensor<2>> = self
            .accum
            .iter_mut()
            .map(|g| g.take().expect("accumulated gradient"))
            .collect();
        adamw::step(
            &mut self.adapter,
            &mut self.moments,
            grads,
            &self.cfg,
            self.step,
            lr,
        )
    }

    /// Prune toward `target` sparsity using the current importance (the bias-corrected EMA;
    /// fresh scores for magnitude and random, and magnitude before the EMA's first sample);
    /// slices the model, adapter, moments and EMA. Returns units removed.
    pub fn prune_to(&mut self, target: f64) -> Result<usize, PruneError> {
        let scores = match self.cfg.criterion {
            Criterion::Random => prune::random_scores(&self.model, &mut self.rng),
            Criterion::Magnitude => prune::magnitude_scores(&self.model),
            _ => self
                .scores()
                .unwrap_or_else(|| prune::magnitude_scores(&self.model)),
        };
        let new = prune::select_prune(
            &self.model.config,
            &self.kept,
            &scores,
            target,
            &self.cfg.prune,
        );
        if new == self.kept {
            return Ok(0);
        }
        let removed: usize = self
            .kept
            .blocks
            .iter()
            .zip(&new.blocks)
            .map(|(o, n)| {
                (o.query_heads.len() - n.query_heads.len())
                    + (o.mlp_channels.len() - n.mlp_channels.len())
            })
            .sum();
        self.apply_kept(new)?;
        Ok(removed)
    }

    /// Re-slice everything to new kept maps (a subset of the current ones): the model in
    /// place, the adapter, the optimiser moments and the importance EMA.
    pub fn apply_kept(&mut self, new: KeptIndices) -> Result<(), PruneError> {
        prune::narrow(&mut self.model, &self.kept, &new)?;
        let hd = self.model.config.head_dim;
        let mut k = 0;
        for (l, blk) in self.adapter.blocks.iter_mut().enumerate() {
            let (old_b, new_b) = (&self.kept.blocks[l], &new.blocks[l]);
            for (&p, f) in Proj::ALL.iter().zip(blk.iter_mut()) {
                for (is_a, param) in [(true, &mut f.a), (false, &mut f.b)] {
                    let sl = |t: Tensor<2>| prune::slice_factor(t, p, is_a, old_b, new_b, hd);
                    *param = sl(param.clone());
                    let (m, v) = &mut self.moments[k];
                    *m = sl(m.clone());
                    *v = sl(v.clone());
                    k += 1;
                }
            }
        }
        self.importance = self.importance.slice(&self.kept, &new);
        self.kept = new;
        Ok(())
    }
}

/// What one local round did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundReport {
    pub steps: Vec<StepRecord>,
    pub sparsity_before: f64,
    pub sparsity_after: f64,
    /// (optimiser step, sparsity reached) of each pruning event.
    pub prune_events: Vec<(usize, f64)>,
}

impl Tuner {
    /// One local round: `steps` optimiser steps on batches from `next_batch(micro_index)`,
    /// pruning toward `target` sparsity in the events of [`prune_schedule`] with the targets
    /// of [`event_targets`] (gradual by default). A target at or below the current sparsity
    /// means no further pruning (pruning is never undone).
    pub fn run_round(
        &mut self,
        steps: usize,
        target: f64,
        next_batch: impl FnMut(usize) -> Batch,
        mut on_step: impl FnMut(&StepRecord),
    ) -> Result<RoundReport, PruneError> {
        self.run_round_while(steps, target, next_batch, |r| {
            on_step(r);
            true
        })
    }

    /// [`Tuner::run_round`] that stops after any step where `on_step` returns false (the
    /// report then holds the steps done).
    pub fn run_round_while(
        &mut self,
        steps: usize,
        target: f64,
        mut next_batch: impl FnMut(usize) -> Batch,
        mut on_step: impl FnMut(&StepRecord) -> bool,
    ) -> Result<RoundReport, PruneError> {
        let before = self.sparsity();
        let c = &self.cfg;
        let events = if target > before + 1e-12 {
            prune_schedule(steps, c.prune_every, c.min_prune_events, c.prune_shape)
        } else {
            Vec::new()
        };
        let targets = event_targets(before, target, events.len(), c.prune_shape);
        let mut records = Vec::with_capacity(steps);
        let mut prune_events = Vec::new();
        let mut micro = 0;
        let first_step = self.step;
        for s in 0..steps {
            let lr = lr_at(&self.cfg, s, steps);
            let pending = events.iter().any(|&e| e > s);
            let rec = loop {
                let b = next_batch(micro);
                micro += 1;
                if let Some(r) = self.train_micro(&b, lr, pending) {
                    break r;
                }
            };
            let go_on = on_step(&rec);
            records.push(rec);
            let done = self.step - first_step;
            if !go_on {
                break;
            }
            if let Some(k) = events.iter().position(|&e| e == done) {
                self.prune_to(targets[k])?;
                prune_events.push((done, self.sparsity()));
            }
        }
        Ok(RoundReport {
            steps: records,
            sparsity_before: before,
            sparsity_after: self.sparsity(),
            prune_events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::prune::KeptIndicesExt;
    use burn::tensor::Device;

    fn tiny() -> (Llama, ModelConfig) {
        let mut c = ModelConfig::dense(40, 16, 3, 4, 2, 4, 32, true);
        c.max_seq_len = 32;
        (Llama::random(c.clone(), 11, &Device::flex()), c)
    }

    #[test]
    fn block_recomputation_gives_the_same_step() {
        let (base, c) = tiny();
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..13).map(|i| ((i * 5 + r) % 40) as u32).collect())
            .collect();
        let batch = Batch::lm(&windows);
        let run = |recompute: bool| {
            let cfg = TrainConfig {
                recompute_blocks: recompute,
                criterion: Criterion::Taylor,
                ..TrainConfig::default()
            };
            let mut t = Tuner::new(
                &base,
                KeptIndices::dense(&c),
                Adapter::new(&c, 4, 8.0, 2, &base.device),
                cfg,
            )
            .unwrap();
            let mut recs = Vec::new();
            for _ in 0..3 {
                recs.push(t.train_micro(&batch, 1e-2, true).unwrap());
            }
            let a: Vec<f32> = t.adapter.blocks[1][Proj::Up.index()]
                .b
                .clone()
                .into_data()
                .try_to_vec()
                .unwrap();
            (recs, a, t.scores().unwrap())
        };
        let (r1, a1, s1) = run(false);
        let (r2, a2, s2) = run(true);
        for (x, y) in r1.iter().zip(&r2) {
            assert!(
                (x.loss - y.loss).abs() < 1e-4
                    && (x.grad_norm - y.grad_norm).abs() < 1e-3 * x.grad_norm.max(1.0)
            );
        }
        for (x, y) in a1.iter().zip(&a2) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        for (x, y) in s1.iter().zip(&s2) {
            for (p, q) in x.channels.iter().zip(&y.channels) {
                assert!((p - q).abs() <= 1e-3 * p.abs().max(1e-6), "{p} vs {q}");
            }
        }
    }

    /// The importance EMA handed from one tuner to the next (as a device carries it from
    /// round to round, through a serialised state) continues exactly: with the adapter held
    /// still (learning rate 0, so every step sees the same gradients), two rounds of 3 steps
    /// with a prune between them give the same scores as one run of 6 steps with the prune
    /// in the middle.
    #[test]
    fn importance_carries_over_rounds() {
        let (base, c) = tiny();
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..13).map(|i| ((i * 7 + r) % 40) as u32).collect())
            .collect();
        let batch = Batch::lm(&windows);
        let cfg = TrainConfig {
            prune: PruneConfig {
                min_channels_per_block: 4,
                ..PruneConfig::for_layers(3)
            },
            ..TrainConfig::default()
        };
        let fresh = || {
            let ad = Adapter::new(&c, 4, 8.0, 2, &base.device);
            let mut t = Tuner::new(&base, KeptIndices::dense(&c), ad, cfg.clone()).unwrap();
            // One real step first (no importance), so B is not zero.
            t.train_micro(&batch, 1e-2, false).unwrap();
            t
        };
        let steps = |t: &mut Tuner, n: usize| {
            for _ in 0..n {
                t.train_micro(&batch, 0.0, true).unwrap();
            }
        };
        let mut one = fresh();
        steps(&mut one, 3);
        one.prune_to(0.2).unwrap();
        steps(&mut one, 3);

        let mut first = fresh();
        steps(&mut first, 3);
        first.prune_to(0.2).unwrap();
        assert_eq!(first.importance.samples, 3);
        let carried: Importance =
            serde_json::from_str(&serde_json::to_string(&first.importance).unwrap()).unwrap();
        let mut second = Tuner::new(&base, first.kept.clone(), first.adapter.clone(), cfg)
            .unwrap()
            .with_importance(carried)
            .unwrap();
        steps(&mut second, 3);
        assert_eq!(second.kept, one.kept);
        assert_eq!(second.importance.samples, 6);
        assert_eq!(second.scores(), one.scores());
        // A carried EMA that does not fit the kept maps is refused, naming the block.
        let mut bad = one.importance.clone();
        bad.ema[1].channels.pop();
        let e = Tuner::new(
            &base,
            one.kept.clone(),
            one.adapter.clone(),
            one.cfg.clone(),
        )
        .unwrap()
        .with_importance(bad)
        .err()
        .unwrap();
        assert!(e.to_string().contains("block 1"), "{e}");
    }

    #[test]
    fn training_lowers_the_loss_and_pruning_slices_state() {
        let (base, c) = tiny();
        let adapter = Adapter::new(&c, 4, 8.0, 1, &base.device);
        let cfg = TrainConfig {
            lr: 1e-2,
            prune: PruneConfig {
                min_channels_per_block: 4,
                ..PruneConfig::for_layers(3)
            },
            ..TrainConfig::default()
        };
        let mut t = Tuner::new(&base, KeptIndices::dense(&c), adapter, cfg).unwrap();
        let windows: Vec<Vec<u32>> = (0..4)
            .map(|r| (0..17).map(|i| ((i * 3 + r) % 40) as u32).collect())
            .collect();
        let batch = Batch::lm(&windows);
        let first = t.train_micro(&batch, 1e-2, true).unwrap();
        let mut last = first.clone();
        for _ in 0..30 {
            last = t.train_micro(&batch, 1e-2, true).unwrap();
        }
        assert!(
            last.loss < first.loss * 0.8,
            "{} -> {}",
            first.loss,
            last.loss
        );
        let removed = t.prune_to(0.2).unwrap();
        assert!(removed > 0);
        assert!(t.sparsity() >= 0.2 - 1e-9);
        // The adapter follows the model's new shapes, and training continues.
        let q = &t.adapter.blocks[1][Proj::Gate.index()];
        assert_eq!(q.b.dims()[1], t.model.config.blocks[1].ffn_dim);
        let after = t.train_micro(&batch, 1e-2, true).unwrap();
        assert!(after.loss.is_finite());
    }
}
