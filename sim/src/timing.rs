//! The time model: how long a device computes and how long a message travels, on the virtual
//! clock. Only time is modelled; the training itself is real.
//!
//! **Compute.** A local round's FLOPs are the sum over its optimiser steps of
//! `cost::train_step_flops(shape during the step, rank, batch, seq)` plus two held-out
//! evaluations (before and after, `cost::forward_flops`). The shape during a step is not
//! recorded per step, but its non-embedding parameter count is (`StepRecord::params`); FLOPs are
//! affine in the kept units, so a step's FLOPs are interpolated between the round's starting
//! and final shapes by that count (exact when pruning removes MLP channels only, within a few
//! percent when it also removes heads, whose attention-score cost differs). Importance scoring
//! and optimiser updates are ignored (under 1% of a step at our sizes). Time is
//! `FLOPs / (train_gflops * power_mode * draw)`, where `draw` is the device's per-round speed
//! factor from a truncated normal around 1.
//!
//! **Transfer.** `bytes * 8 / rate + rtt`, with the rate of the direction's link (uplink for
//! device -> aggregator, downlink the other way); a link carries one message at a time, later
//! messages queue behind it. The aggregator's own link is assumed not to be the bottleneck.
//!
//! **Memory.** `cost::train_memory(shape at the round's start, arm rank, batch, seq)`; the
//! round's start is its largest shape, since pruning only shrinks the model.

use device_agent::cost;
use device_agent::model::ModelConfig;
use device_agent::train::RoundReport;

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

/// FLOPs of a round from its report, the starting and final shapes.
pub fn round_flops(
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
        .map(|s| {
            if (p_pre - p_post).abs() < 0.5 {
                f_pre
            } else {
                let frac = ((s.params as f64 - p_post) / (p_pre - p_post)).clamp(0.0, 1.0);
                f_post + (f_pre - f_post) * frac
            }
        })
        .sum();
    let eval = cost::forward_flops(pre, shape.eval_tokens, shape.eval_seq, true)
        + cost::forward_flops(post, shape.eval_tokens, shape.eval_seq, true);
    RoundFlops { train, eval }
}

/// FLOPs of a round when only the shapes are known (the surrogate): steps before the first
/// pruning event run at the starting shape, the rest at the average of the two.
pub fn round_flops_estimate(
    pre: &ModelConfig,
    post: &ModelConfig,
    shape: StepShape,
    steps: usize,
) -> RoundFlops {
    let f_pre = cost::train_step_flops(pre, shape.rank, shape.batch, shape.seq);
    let f_post = cost::train_step_flops(post, shape.rank, shape.batch, shape.seq);
    let train = steps as f64 * 0.5 * (f_pre + f_post);
    let eval = cost::forward_flops(pre, shape.eval_tokens, shape.eval_seq, true)
        + cost::forward_flops(post, shape.eval_tokens, shape.eval_seq, true);
    RoundFlops { train, eval }
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

/// Latency of one inference forward pass over `tokens` tokens (a prompt of that length) on a
/// device with `infer_gflops`, in milliseconds (fractional).
pub fn inference_ms(cfg: &ModelConfig, tokens: usize, infer_gflops: f64) -> f64 {
    cost::forward_flops(cfg, tokens, tokens, true) / (infer_gflops * 1e9) * 1000.0
}

/// Peak training memory of a round that starts at `cfg`.
pub fn peak_memory(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> u64 {
    cost::train_memory(cfg, rank, batch, seq).total
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_agent::train::StepRecord;

    fn cfg(ffn: usize) -> ModelConfig {
        let mut c = ModelConfig::dense(1000, 64, 4, 4, 2, 16, 256, true);
        for b in &mut c.blocks {
            b.ffn_dim = ffn;
        }
        c
    }

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

    #[test]
    fn step_flops_follow_the_pruned_shape() {
        let (pre, post) = (cfg(256), cfg(128));
        let shape = StepShape {
            rank: 8,
            batch: 2,
            seq: 32,
            eval_tokens: 64,
            eval_seq: 32,
        };
        let pp = pre.non_embedding_params();
        let pq = post.non_embedding_params();
        let f_pre = cost::train_step_flops(&pre, 8, 2, 32);
        let f_post = cost::train_step_flops(&post, 8, 2, 32);
        // Two steps at the start shape, two at the end shape.
        let r = round_flops(&pre, &post, shape, &report(&[pp, pp, pq, pq]));
        assert!((r.train - 2.0 * (f_pre + f_post)).abs() < 1.0);
        // A step half-way through the pruning costs the mean of the two.
        let mid = (pp + pq) / 2;
        let r = round_flops(&pre, &post, shape, &report(&[mid]));
        assert!((r.train / (0.5 * (f_pre + f_post)) - 1.0).abs() < 1e-3);
        // No pruning: every step at the dense shape.
        let r = round_flops(&pre, &pre, shape, &report(&[pp, pp, pp]));
        assert!((r.train - 3.0 * f_pre).abs() < 1.0);
        assert!(r.eval > 0.0);
    }

    #[test]
    fn transfers_and_compute_in_milliseconds() {
        // 1 MB at 8 Mbit/s is one second, plus the round trip.
        assert_eq!(transfer_ms(1_000_000, 8.0, 20.0), 1020);
        assert_eq!(compute_ms(2e9, 1.0), 2000);
        assert_eq!(compute_ms(0.0, 1.0), 1);
    }
}
