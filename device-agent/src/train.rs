//! Prune-and-tune on one device: LoRA fine-tuning (AdamW on the adapter only, warm-up +
//! cosine learning rate, global-norm clipping, gradient accumulation) interleaved with
//! structured pruning toward a sparsity target every K steps, guided by an importance EMA.
//!
//! The loss is computed in row chunks straight from the final hidden states: for each chunk
//! the logits, the cross-entropy and its gradient with respect to the hidden rows are formed
//! by hand (softmax minus one-hot, times the tied embedding), so the `[tokens, vocab]` logits
//! never exist at once and never enter the autodiff graph. The graph then runs backward from
//! `sum(h * dL/dh)` through the decoder into the LoRA factors.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::eval::LOGIT_CHUNK_ROWS;
use crate::lora::{Adapter, LoraFactors};
use crate::model::{Llama, Proj};
use crate::prune::{self, BlockScores, Criterion, KeptMaps, PruneConfig, PruneError};

/// Optimiser and schedule settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub lr: f64,
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
    /// Importance EMA factor (`I = lambda * I_prev + (1 - lambda) * I_now`).
    pub ema_lambda: f64,
    /// Optimiser steps between pruning events.
    pub prune_every: usize,
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
            criterion: Criterion::LoraGradient,
            prune: PruneConfig::default(),
            seed: 0,
            checkpointing: false,
            recompute_blocks: false,
        }
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`.
pub fn lr_at(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    let warm = cfg.warmup_steps.min(total / 5);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / (warm + 1) as f64;
    }
    let span = total.saturating_sub(warm).max(1) as f64;
    let t = ((step - warm) as f64 / span).min(1.0);
    let min = cfg.lr * cfg.min_lr_ratio;
    min + (cfg.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// One micro-batch: token rows of equal length and, per position (row-major), the token to
/// predict there (`None` = no loss at this position).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<Vec<u32>>,
    pub targets: Vec<Option<u32>>,
}

impl Batch {
    /// Causal-LM batch from windows of `L + 1` tokens: inputs `w[..L]`, targets `w[1..]`.
    pub fn lm(windows: &[Vec<u32>]) -> Batch {
        let tokens: Vec<Vec<u32>> = windows.iter().map(|w| w[..w.len() - 1].to_vec()).collect();
        let targets = windows
            .iter()
            .flat_map(|w| w[1..].iter().map(|&t| Some(t)))
            .collect();
        Batch { tokens, targets }
    }

    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// What one micro-batch measured.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the targets (nats).
    pub loss: f64,
    pub targets: usize,
    pub correct: usize,
}

/// Chunked cross-entropy from hidden rows: returns (sum of NLL, correct argmax count, dL/dh)
/// where `L = sum NLL / norm`.
pub fn chunked_ce(
    model: &Llama,
    h: Tensor<2>,
    targets: &[Option<u32>],
    norm: f64,
) -> (f64, usize, Tensor<2>) {
    let [n, d] = h.dims();
    let device = model.device.clone();
    let head = match &model.lm_head {
        Some(w) => w.clone().transpose(), // [vocab, d]
        None => model.embed.clone(),
    };
    let mut nll = 0.0;
    let mut correct = 0;
    let mut grads = Vec::new();
    let mut start = 0;
    while start < n {
        let len = LOGIT_CHUNK_ROWS.min(n - start);
        let tg = &targets[start..start + len];
        if tg.iter().all(Option::is_none) {
            grads.push(Tensor::zeros([len, d], &device));
            start += len;
            continue;
        }
        let hc = h.clone().narrow(0, start, len);
        let logits = hc.matmul(head.clone().transpose()); // [len, vocab]
                                                          // One fused pass on the CPU backend (loss, predictions and gradient together).
        if let Some((dlogits, row_nll, pred)) =
            crate::kernels::cross_entropy_rows(&logits, tg, (1.0 / norm) as f32)
        {
            for ((t, l), p) in tg.iter().zip(&row_nll).zip(&pred) {
                if let Some(t) = t {
                    nll += f64::from(*l);
                    correct += usize::from(*p == *t as usize);
                }
            }
            grads.push(dlogits.matmul(head.clone()));
            start += len;
            continue;
        }
        // Predictions in one pass; probabilities from the backend's fused row softmax (one
        // vectorised, row-parallel pass, where exp element by element is scalar).
        let pred = logits.clone().argmax(1); // [len, 1]
        let logits_for_loss = logits.clone();
        let probs = crate::kernels::softmax_last(&logits).unwrap_or_else(|| softmax(logits, 1));
        let idx: Vec<i64> = tg.iter().map(|t| t.unwrap_or(0) as i64).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [len, 1]), &device);
        let w: Vec<f32> = tg
            .iter()
            .map(|t| if t.is_some() { 1.0 } else { 0.0 })
            .collect();
        // The exact loss, -log_softmax at the target (no underflow of a tiny probability).
        let lp_tgt: Vec<f32> = log_softmax(logits_for_loss, 1)
            .gather(1, idx.clone())
            .into_data()
            .try_to_vec()
            .expect("floats");
        nll += lp_tgt
            .iter()
            .zip(&w)
            .map(|(&lp, &wi)| -f64::from(lp) * f64::from(wi))
            .sum::<f64>();
        let w = Tensor::<2>::from_data(TensorData::new(w.clone(), [len, 1]), &device);
        let pred: Vec<i64> = pred
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .expect("ints");
        for (k, t) in tg.iter().enumerate() {
            if let Some(t) = t {
                if pred[k] == *t as i64 {
                    correct += 1;
                }
            }
        }
        // dNLL/dlogits = (softmax - onehot) * w / norm.
        let w = w.div_scalar(norm);
        let dlogits =
            (probs * w.clone()).scatter(1, idx, w.neg(), burn::tensor::IndexingUpdateOp::Add);
        grads.push(dlogits.matmul(head.clone()));
        start += len;
    }
    (nll, correct, Tensor::cat(grads, 0))
}

/// Flat index of a factor: `(block * 7 + proj) * 2 + (0 for a, 1 for b)`.
fn fidx(l: usize, p: Proj, is_a: bool) -> usize {
    (l * 7 + p.index()) * 2 + usize::from(!is_a)
}

/// A device's prune-and-tune state: the sliced model, kept maps, adapter, AdamW moments,
/// accumulated gradients and the importance EMA.
pub struct Tuner {
    pub model: Llama,
    pub kept: KeptMaps,
    pub adapter: Adapter,
    pub cfg: TrainConfig,
    /// Optimiser steps taken.
    pub step: usize,
    moments: Vec<(Tensor<2>, Tensor<2>)>,
    accum: Vec<Option<Tensor<2>>>,
    accum_micro: usize,
    accum_stats: StepStats,
    /// Importance EMA (per kept unit, local order).
    pub scores: Option<Vec<BlockScores>>,
    rng: rand_chacha::ChaCha8Rng,
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
    /// Start from the dense base, kept maps and (optionally) an adapter already shaped to
    /// those maps.
    pub fn new(
        base: &Llama,
        kept: KeptMaps,
        adapter: Adapter,
        cfg: TrainConfig,
    ) -> Result<Self, PruneError> {
        let model = prune::slice_model(base, &kept)?;
        let n = model.config.n_layers() * 14;
        let mut moments = Vec::with_capacity(n);
        for blk in &adapter.blocks {
            for f in blk {
                moments.push((f.a.zeros_like(), f.a.zeros_like()));
                moments.push((f.b.zeros_like(), f.b.zeros_like()));
            }
        }
        let rng = prune::scores_rng(cfg.seed);
        Ok(Tuner {
            model,
            kept,
            adapter,
            cfg,
            step: 0,
            moments,
            accum: vec![None; n],
            accum_micro: 0,
            accum_stats: StepStats::default(),
            scores: None,
            rng,
        })
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
            let mut m = self.model.clone();
            for b in &mut m.blocks {
                for p in [Proj::Q, Proj::O, Proj::Gate, Proj::Up, Proj::Down] {
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
            let (nll, correct, dh) =
                chunked_ce(&self.model, h.clone().inner(), &batch.targets, norm);
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
            let (nll, correct, dh) =
                chunked_ce(&self.model, h.clone().inner(), &batch.targets, norm);
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
                .expect("gradients")
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
                        prune::group_scores(
                            i(Proj::Q),
                            i(Proj::O),
                            i(Proj::Gate),
                            i(Proj::Up),
                            i(Proj::Down),
                            hd,
                        )
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

    /// LoRA-gradient importance from the accumulated gradients (before the update).
    fn lora_scores(&self) -> Vec<BlockScores> {
        let s = self.adapter.scale();
        let hd = self.model.config.head_dim;
        self.model
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let imp = |p: Proj| {
                    let f = &self.adapter.blocks[l][p.index()];
                    let da = self.accum[fidx(l, p, true)].clone().expect("gradient");
                    let db = self.accum[fidx(l, p, false)].clone().expect("gradient");
                    let g = (da.clone().matmul(f.b.clone()) + f.a.clone().matmul(db.clone())
                        - da.matmul(db))
                    .mul_scalar(s);
                    let w = b.weight(p).clone() + f.a.clone().matmul(f.b.clone()).mul_scalar(s);
                    (g * w).abs()
                };
                prune::group_scores(
                    imp(Proj::Q),
                    imp(Proj::O),
                    imp(Proj::Gate),
                    imp(Proj::Up),
                    imp(Proj::Down),
                    hd,
                )
            })
            .collect()
    }

    fn update_ema(&mut self, now: Vec<BlockScores>) {
        let lam = self.cfg.ema_lambda;
        self.scores = Some(match self.scores.take() {
            None => now,
            Some(prev) => prev
                .into_iter()
                .zip(now)
                .map(|(p, n)| BlockScores {
                    heads: p
                        .heads
                        .iter()
                        .zip(&n.heads)
                        .map(|(a, b)| lam * a + (1.0 - lam) * b)
                        .collect(),
                    channels: p
                        .channels
                        .iter()
                        .zip(&n.channels)
                        .map(|(a, b)| lam * a + (1.0 - lam) * b)
                        .collect(),
                })
                .collect(),
        });
    }

    /// Run one micro-batch; when `grad_accum` micro-batches have been seen, take an AdamW
    /// step at learning rate `lr` and return its record.
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
        let (st, taylor_scores) = self.micro(batch, norm, track_importance);
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
        if track_importance {
            match self.cfg.criterion {
                Criterion::LoraGradient => {
                    let s = self.lora_scores();
                    self.update_ema(s);
                }
                Criterion::Magnitude => {
                    let s = prune::magnitude_scores(&self.model);
                    self.scores = Some(s);
                }
                Criterion::Random | Criterion::Taylor => {}
            }
        }
        let grad_norm = self.apply_adamw(lr);
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

    /// Clip and apply AdamW to every factor; returns the pre-clip global gradient norm.
    fn apply_adamw(&mut self, lr: f64) -> f64 {
        let grads: Vec<Tensor<2>> = self
            .accum
            .iter_mut()
            .map(|g| g.take().expect("accumulated gradient"))
            .collect();
        let sq: Vec<Tensor<1>> = grads
            .iter()
            .map(|g| g.clone().square().sum().reshape([1]))
            .collect();
        let total: f32 = Tensor::cat(sq, 0).sum().into_scalar();
        let norm = (total as f64).sqrt();
        let clip = if self.cfg.clip_norm > 0.0 && norm > self.cfg.clip_norm {
            self.cfg.clip_norm / norm
        } else {
            1.0
        };
        let c = &self.cfg;
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let mut k = 0;
        for blk in self.adapter.blocks.iter_mut() {
            for f in blk.iter_mut() {
                for param in [&mut f.a, &mut f.b] {
                    let g = grads[k].clone().mul_scalar(clip);
                    let (m, v) = &mut self.moments[k];
                    let m_new = m.clone().mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
                    let v_new =
                        v.clone().mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2);
                    let upd = m_new.clone().div_scalar(bc1)
                        / (v_new.clone().div_scalar(bc2).sqrt() + c.eps);
                    let decayed = if c.weight_decay > 0.0 {
                        param.clone().mul_scalar(1.0 - lr * c.weight_decay)
                    } else {
                        param.clone()
                    };
                    *param = decayed - upd.mul_scalar(lr);
                    *m = m_new;
                    *v = v_new;
                    k += 1;
                }
            }
        }
        norm
    }

    /// Prune toward `target` sparsity using the current importance (random scores for the
    /// random criterion); slices the model, adapter, moments and EMA. Returns units removed.
    pub fn prune_to(&mut self, base: &Llama, target: f64) -> Result<usize, PruneError> {
        let scores = match self.cfg.criterion {
            Criterion::Random => prune::random_scores(&self.model, &mut self.rng),
            Criterion::Magnitude => prune::magnitude_scores(&self.model),
            _ => match &self.scores {
                Some(s) => s.clone(),
                None => prune::magnitude_scores(&self.model),
            },
        };
        let new = prune::select_prune(&base.config, &self.kept, &scores, target, &self.cfg.prune);
        if new == self.kept {
            return Ok(0);
        }
        let removed: usize = self
            .kept
            .blocks
            .iter()
            .zip(&new.blocks)
            .map(|(o, n)| (o.heads.len() - n.heads.len()) + (o.channels.len() - n.channels.len()))
            .sum();
        self.apply_kept(base, new)?;
        Ok(removed)
    }

    /// Re-slice everything to new kept maps (a subset of the current ones).
    pub fn apply_kept(&mut self, base: &Llama, new: KeptMaps) -> Result<(), PruneError> {
        self.model = prune::slice_model(base, &new)?;
        let hd = base.config.head_dim;
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
        if let Some(s) = &self.scores {
            self.scores = Some(prune::slice_scores(s, &self.kept, &new));
        }
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
    /// pruning toward `target` sparsity in equal steps every `prune_every` steps. A target at
    /// or below the current sparsity means no further pruning (pruning is never undone).
    pub fn run_round(
        &mut self,
        base: &Llama,
        steps: usize,
        target: f64,
        mut next_batch: impl FnMut(usize) -> Batch,
        mut on_step: impl FnMut(&StepRecord),
    ) -> Result<RoundReport, PruneError> {
        let before = self.sparsity();
        let events = if target > before + 1e-12 {
            prune_schedule(steps, self.cfg.prune_every)
        } else {
            Vec::new()
        };
        let targets = event_targets(before, target, events.len());
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
            on_step(&rec);
            records.push(rec);
            let done = self.step - first_step;
            if let Some(k) = events.iter().position(|&e| e == done) {
                self.prune_to(base, targets[k])?;
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

/// The steps (1-based optimiser steps) after which pruning happens in a round of `steps`
/// steps with pruning every `every` steps: at `every, 2*every, ...` leaving the last
/// `every` steps for recovery; a round shorter than `every` prunes once, half-way.
pub fn prune_schedule(steps: usize, every: usize) -> Vec<usize> {
    let every = every.max(1);
    if steps == 0 {
        return vec![];
    }
    if steps <= every {
        return vec![(steps / 2).max(1)];
    }
    let n = steps.div_ceil(every) - 1;
    (1..=n).map(|i| i * every).collect()
}

/// Sparsity target of each pruning event: equal steps from `start` to `target`.
pub fn event_targets(start: f64, target: f64, events: usize) -> Vec<f64> {
    if target <= start || events == 0 {
        return vec![start; events];
    }
    (1..=events)
        .map(|i| start + (target - start) * i as f64 / events as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::Device;

    fn tiny() -> (Llama, ModelConfig) {
        let mut c = ModelConfig::dense(40, 16, 3, 4, 2, 4, 32, true);
        c.max_seq_len = 32;
        (Llama::random(c.clone(), 11, &Device::flex()), c)
    }

    #[test]
    fn schedule_prunes_in_equal_steps_and_leaves_recovery() {
        assert_eq!(prune_schedule(100, 20), vec![20, 40, 60, 80]);
        assert_eq!(prune_schedule(10, 20), vec![5]);
        assert_eq!(prune_schedule(41, 20), vec![20, 40]);
        let t = event_targets(0.1, 0.5, 4);
        assert!((t[0] - 0.2).abs() < 1e-12 && (t[3] - 0.5).abs() < 1e-12);
        assert_eq!(event_targets(0.5, 0.3, 2), vec![0.5, 0.5]);
        let c = TrainConfig {
            lr: 1.0,
            warmup_steps: 2,
            min_lr_ratio: 0.0,
            ..TrainConfig::default()
        };
        assert!(lr_at(&c, 0, 20) < lr_at(&c, 1, 20));
        assert!((lr_at(&c, 2, 20) - 1.0).abs() < 1e-12);
        assert!(lr_at(&c, 19, 20) < 0.05);
    }

    #[test]
    fn manual_ce_gradient_matches_autodiff() {
        let (m, _) = tiny();
        let h = Tensor::<2>::random(
            [6, 16],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &m.device,
        );
        let targets = vec![Some(3), None, Some(7), Some(39), None, Some(0)];
        let (nll, _, dh) = chunked_ce(&m, h.clone(), &targets, 4.0);
        // Autodiff reference.
        let leaf = h.clone().autodiff().require_grad();
        let lp = log_softmax(m.logits(leaf.clone()), 1);
        let mut loss: Option<Tensor<1>> = None;
        for (r, t) in targets.iter().enumerate() {
            if let Some(t) = t {
                let x = lp
                    .clone()
                    .narrow(0, r, 1)
                    .narrow(1, *t as usize, 1)
                    .reshape([1])
                    .neg();
                loss = Some(match loss {
                    Some(l) => l + x,
                    None => x,
                });
            }
        }
        let loss = loss.unwrap();
        let want_nll: f32 = loss.clone().inner().into_scalar();
        assert!((nll - want_nll as f64).abs() < 1e-4);
        let grads = loss.div_scalar(4.0).backward();
        let g: Vec<f32> = leaf.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        let ours: Vec<f32> = dh.into_data().try_to_vec().unwrap();
        for (a, b) in g.iter().zip(&ours) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
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
                KeptMaps::dense(&c),
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
            (recs, a, t.scores.clone().unwrap())
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
        let mut t = Tuner::new(&base, KeptMaps::dense(&c), adapter, cfg).unwrap();
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
        let removed = t.prune_to(&base, 0.2).unwrap();
        assert!(removed > 0);
        assert!(t.sparsity() >= 0.2 - 1e-9);
        // The adapter follows the model's new shapes, and training continues.
        let q = &t.adapter.blocks[1][Proj::Gate.index()];
        assert_eq!(q.b.dims()[1], t.model.config.blocks[1].ffn_dim);
        let after = t.train_micro(&batch, 1e-2, true).unwrap();
        assert!(after.loss.is_finite());
    }
}
