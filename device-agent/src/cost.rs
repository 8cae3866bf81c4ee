//! Analytical cost model of a (pruned) model: floating-point operations of a LoRA training
//! step and of inference, and the peak memory of training. The simulator's virtual clock and
//! memory-feasibility checks use it; benchmarks quote measured figures next to it.
//!
//! [`RoundCosts`] is how a device's session sizes a round before starting it (peak memory
//! against its RAM) and a message on the wire: [`PrunedModel`] for a device that holds its own
//! pruned model; the simulator's surrogate sizes the real model it stands in for.
//!
//! FLOP counting: a multiply-add is 2 FLOPs. A training step with a frozen base computes the
//! forward pass, the gradient with respect to activations (another pass of the same matmul
//! size) but no base-weight gradients; LoRA factors cost a forward and two gradient matmuls.

use serde::Serialize;

use crate::model::ModelConfig;
use protocol::KeptIndices;

use crate::prune::KeptIndicesExt;

/// How a device sizes its rounds and messages (a session's out-of-memory pre-check and byte
/// accounting ask it; pure functions, no I/O).
pub trait RoundCosts: Send + Sync + std::fmt::Debug {
    /// The model whose shape sets time and memory for a device with `kept` maps.
    fn shape(&self, kept: &KeptIndices) -> ModelConfig;
    /// Tokens per training sequence.
    fn seq_len(&self) -> usize;
    /// Bytes `msg` takes on the wire when its encoded frame is `frame_len` bytes long.
    fn wire_bytes(&self, _msg: &protocol::Message, frame_len: usize) -> usize {
        frame_len
    }
    /// Peak memory of a round that starts from `kept` at `rank` with `batch` sequences (its
    /// largest shape: pruning only shrinks the model), training in `mode`.
    fn round_memory(&self, kept: &KeptIndices, rank: usize, batch: usize, mode: MemoryMode) -> u64 {
        train_memory_in(&self.shape(kept), rank, batch, self.seq_len(), mode).total
    }
}

/// How training holds what its backward pass needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryMode {
    /// Every block's activations stay from the forward pass to the backward pass (fastest).
    KeepActivations,
    /// Only each block's input is kept; the backward pass rebuilds one block at a time (about
    /// one extra forward of compute, about 0.6x of the peak at the default shape).
    RecomputeBlocks,
}

impl MemoryMode {
    /// The fastest mode whose estimated peak fits in `budget` bytes, with the estimates of
    /// both; `Err` holds the smaller (recomputing) estimate when neither fits.
    pub fn fitting(estimate: impl Fn(MemoryMode) -> u64, budget: u64) -> Result<MemoryMode, u64> {
        for mode in [MemoryMode::KeepActivations, MemoryMode::RecomputeBlocks] {
            if estimate(mode) <= budget {
                return Ok(mode);
            }
        }
        Err(estimate(MemoryMode::RecomputeBlocks))
    }

    /// The mode a `--memory` setting names: `keep`, `recompute`, or `auto` (the fastest that
    /// fits in `ram`; recomputing when neither is estimated to fit, the smaller peak).
    pub fn from_setting(
        setting: &str,
        estimate: impl Fn(MemoryMode) -> u64,
        ram: u64,
    ) -> Result<MemoryMode, String> {
        match setting {
            "keep" => Ok(MemoryMode::KeepActivations),
            "recompute" => Ok(MemoryMode::RecomputeBlocks),
            "auto" => Ok(MemoryMode::fitting(estimate, ram).unwrap_or(MemoryMode::RecomputeBlocks)),
            other => Err(format!(
                "unknown memory mode '{other}' (auto, keep, recompute)"
            )),
        }
    }

    pub fn recomputes(self) -> bool {
        self == MemoryMode::RecomputeBlocks
    }

    pub fn name(self) -> &'static str {
        match self {
            MemoryMode::KeepActivations => "keep-activations",
            MemoryMode::RecomputeBlocks => "recompute-blocks",
        }
    }
}

/// The costs of a device that holds `dense` pruned to its kept maps and trains on sequences of
/// `seq_len` tokens; messages take their encoded size.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunedModel {
    pub dense: ModelConfig,
    pub seq_len: usize,
}

impl RoundCosts for PrunedModel {
    fn shape(&self, kept: &KeptIndices) -> ModelConfig {
        let mut c = self.dense.clone();
        c.blocks = kept.shapes(&self.dense);
        c
    }

    fn seq_len(&self) -> usize {
        self.seq_len
    }
}

/// FLOPs of one forward pass over `tokens` tokens in sequences of `seq` (causal attention).
pub fn forward_flops(cfg: &ModelConfig, tokens: usize, seq: usize, with_lm_head: bool) -> f64 {
    let t = tokens as f64;
    let d = cfg.d_model as f64;
    let hd = cfg.head_dim as f64;
    let mut f = 0.0;
    for b in &cfg.blocks {
        let (nh, nkv, ffn) = (b.n_heads as f64, b.n_kv_heads as f64, b.ffn_dim as f64);
        f += 2.0 * t * d * (2.0 * nh * hd + 2.0 * nkv * hd); // q, o and k, v
        f += 2.0 * t * 3.0 * d * ffn; // gate, up, down
                                      // QK^T and AV with a causal mask: on average half of `seq` keys per query.
        f += 2.0 * 2.0 * t * nh * hd * (seq as f64 + 1.0) / 2.0;
    }
    if with_lm_head {
        f += 2.0 * t * d * cfg.vocab_size as f64;
    }
    f
}

/// FLOPs of the LoRA factors' forward pass (`x A` then `(x A) B` on all seven projections).
pub fn lora_forward_flops(cfg: &ModelConfig, rank: usize, tokens: usize) -> f64 {
    let t = tokens as f64;
    let r = rank as f64;
    let d = cfg.d_model as f64;
    let hd = cfg.head_dim as f64;
    cfg.blocks
        .iter()
        .map(|b| {
            let q = b.n_heads as f64 * hd;
            let kv = b.n_kv_heads as f64 * hd;
            let f = b.ffn_dim as f64;
            // (in + out) per projection
            let io = (d + q) + 2.0 * (d + kv) + (q + d) + 2.0 * (d + f) + (f + d);
            2.0 * t * r * io
        })
        .sum()
}

/// FLOPs of one LoRA training step on `batch` sequences of `seq` tokens.
pub fn train_step_flops(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> f64 {
    let tokens = batch * seq;
    2.0 * forward_flops(cfg, tokens, seq, true) + 3.0 * lora_forward_flops(cfg, rank, tokens)
}

/// Estimated peak memory of training, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MemoryEstimate {
    /// The weights of the model trained. Not counted: the dense base a pruned model was sliced
    /// from, which the agent keeps loaded beside it (BENCHMARKS.md, "Keeping only what the
    /// gradients need").
    pub weights: u64,
    pub adapter_and_optimizer: u64,
    pub activations: u64,
    pub total: u64,
}

/// Peak training memory with every block's activations kept ([`MemoryMode::KeepActivations`]).
pub fn train_memory(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> MemoryEstimate {
    train_memory_in(cfg, rank, batch, seq, MemoryMode::KeepActivations)
}

/// Fixed cost of a training process beside its tensors (runtime, tokenizer, thread pools).
pub const PROCESS_OVERHEAD_BYTES: u64 = 32 << 20;

/// Peak training memory: f32 weights, the adapter with its gradient and two AdamW moments,
/// the activations kept for the backward pass (per block: the block's input and residual sum,
/// the queries, the rotated keys and the values, the attention output, SwiGLU's gate and up (see
/// [`crate::fused`] for why nothing more) and the LoRA products; one block's attention scores at
/// a time; in
/// [`MemoryMode::RecomputeBlocks`] each block's input and one block's activations), one logit
/// chunk with its gradient, and [`PROCESS_OVERHEAD_BYTES`]. Within 5% of the measured peaks of both modes at
/// the default shape (a test below).
pub fn train_memory_in(
    cfg: &ModelConfig,
    rank: usize,
    batch: usize,
    seq: usize,
    mode: MemoryMode,
) -> MemoryEstimate {
    // u128 throughout, saturated to u64 at the end: a hostile rank or batch can make the
    // estimate huge but never wrap below the device's RAM.
    let n = |v: usize| v as u128;
    let f = 4u128;
    let weights = n(cfg.total_params()) * f;
    let (rank, batch, seq) = (n(rank), n(batch), n(seq));
    let tokens = batch * seq;
    let d = n(cfg.d_model);
    let hd = n(cfg.head_dim);
    let mut adapter = 0u128;
    let mut act = 0u128;
    let mut largest_block = 0u128;
    let mut largest_scores = 0u128;
    for b in &cfg.blocks {
        let (q, kv, ffn) = (n(b.n_heads) * hd, n(b.n_kv_heads) * hd, n(b.ffn_dim));
        adapter = adapter
            .saturating_add(rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ffn) + (ffn + d)));
        // input and residual sum (2x d); q, rotated k, v and the attention output; gate and
        // up; no normed copies, attention probabilities or SwiGLU product (recomputed in the
        // backward pass)
        let block = tokens
            .saturating_mul(2 * d + 2 * q + 2 * kv + 2 * ffn)
            .saturating_add(tokens.saturating_mul(rank).saturating_mul(7));
        largest_block = largest_block.max(block);
        largest_scores =
            largest_scores.max(tokens.saturating_mul(seq).saturating_mul(n(b.n_heads)));
        act = act.saturating_add(match mode {
            MemoryMode::KeepActivations => block,
            MemoryMode::RecomputeBlocks => tokens.saturating_mul(d),
        });
    }
    if mode == MemoryMode::RecomputeBlocks {
        act = act.saturating_add(largest_block);
    }
    // One block's scores, probabilities and their gradient live at a time.
    act = act.saturating_add(largest_scores.saturating_mul(3));
    let adapter_and_optimizer = adapter.saturating_mul(f * 4);
    // The loss's chunk of logits and their gradient, alive together (the cross-entropy writes
    // the gradient into a buffer of its own; `train::loss::CE_CHUNK_ROWS`).
    let logits_chunk = n(crate::train::loss::CE_CHUNK_ROWS) * n(cfg.vocab_size) * 2;
    let activations = act.saturating_add(logits_chunk).saturating_mul(f);
    let total = weights
        .saturating_add(adapter_and_optimizer)
        .saturating_add(activations)
        .saturating_add(u128::from(PROCESS_OVERHEAD_BYTES));
    let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    MemoryEstimate {
        weights: clamp(weights),
        adapter_and_optimizer: clamp(adapter_and_optimizer),
        activations: clamp(activations),
        total: clamp(total),
    }
}

/// Bytes of packed weights a model keeps beside its fp32 weights for `precision`'s products
/// ([`crate::bf16::cache`]), at most the cache's budget: none in fp32; with bf16 products every
/// projection and the LM head in both layouts, 2 bytes a value; with int8 products every
/// projection in both layouts, a byte a value (the head stays fp32), padding and row scales
/// aside. Add it to [`train_memory_in`]'s estimate.
pub fn kept_bytes(cfg: &ModelConfig, precision: crate::bf16::Precision) -> u64 {
    use crate::bf16::Precision;
    let body = cfg.non_embedding_params() as u64;
    let bytes = match precision {
        Precision::Fp32 => 0,
        Precision::Bf16 => (body + (cfg.vocab_size * cfg.d_model) as u64).saturating_mul(2 * 2),
        Precision::Int8 => body.saturating_mul(2),
    };
    bytes.min(crate::bf16::cache::BUDGET_BYTES as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's kept bf16 packings come to about 540 MB, its int8 rows to about 210 MB,
    /// fp32 keeps none; a larger model's stop at the cache's budget.
    #[test]
    fn packings_are_counted_up_to_the_budget() {
        use crate::bf16::Precision;
        let smol = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        let kept = kept_bytes(&smol, Precision::Bf16);
        assert!((530e6..550e6).contains(&(kept as f64)), "{kept}");
        let int8 = kept_bytes(&smol, Precision::Int8);
        assert!((200e6..220e6).contains(&(int8 as f64)), "{int8}");
        assert_eq!(kept_bytes(&smol, Precision::Fp32), 0);
        let big = ModelConfig::dense(49152, 2048, 24, 32, 32, 64, 8192, true);
        assert_eq!(
            kept_bytes(&big, Precision::Bf16),
            crate::bf16::cache::BUDGET_BYTES as u64
        );
    }

    #[test]
    fn pruning_cuts_flops_and_memory() {
        let dense = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        let mut pruned = dense.clone();
        for b in &mut pruned.blocks {
            b.ffn_dim = 768;
        }
        let fd = train_step_flops(&dense, 16, 4, 256);
        let fp = train_step_flops(&pruned, 16, 4, 256);
        assert!(fp < fd * 0.8 && fp > fd * 0.4);
        // Roughly 6 * params * tokens for a full fine-tune; LoRA skips weight gradients: ~4x.
        let approx = 4.0 * dense.total_params() as f64 * 1024.0;
        assert!((fd / approx - 1.0).abs() < 0.25, "{fd} vs {approx}");
        assert!(train_memory(&pruned, 16, 4, 256).total < train_memory(&dense, 16, 4, 256).total);
        assert!(train_memory(&dense, 64, 4, 256).total > train_memory(&dense, 4, 4, 256).total);
    }

    #[test]
    fn the_estimates_match_the_measured_peaks_of_both_modes() {
        // Peak RSS of the dense rank-16 step at batch 4 x 256 on SmolLM2-135M with the loss's
        // 256-row logit chunks (`cargo bench -p device-agent --bench speed -- step 0 16 [keep |
        // recompute]`, session 37, BENCHMARKS.md "256 rows of logits per loss chunk"): 1,407 MiB
        // keeping activations, 830 MiB recomputing.
        let dense = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        for (mode, measured) in [
            (MemoryMode::KeepActivations, 1407.0),
            (MemoryMode::RecomputeBlocks, 830.0),
        ] {
            let est = train_memory_in(&dense, 16, 4, 256, mode).total as f64 / (1 << 20) as f64;
            eprintln!("{mode:?}: estimated {est:.0} MiB, measured {measured} MiB");
            assert!(
                (est / measured - 1.0).abs() < 0.05,
                "{mode:?}: {est:.0} vs {measured} MiB"
            );
        }
    }

    #[test]
    fn auto_picks_the_fastest_mode_that_fits() {
        let est = |m| match m {
            MemoryMode::KeepActivations => 300,
            MemoryMode::RecomputeBlocks => 100,
        };
        let pick = |s: &str, ram| MemoryMode::from_setting(s, est, ram);
        assert_eq!(pick("auto", 300), Ok(MemoryMode::KeepActivations));
        assert_eq!(pick("auto", 299), Ok(MemoryMode::RecomputeBlocks));
        assert_eq!(pick("auto", 50), Ok(MemoryMode::RecomputeBlocks));
        assert_eq!(pick("keep", 50), Ok(MemoryMode::KeepActivations));
        assert_eq!(pick("recompute", 1000), Ok(MemoryMode::RecomputeBlocks));
        assert!(pick("low", 1000)
            .unwrap_err()
            .contains("auto, keep, recompute"));
        assert_eq!(MemoryMode::fitting(est, 99), Err(100));
    }

    #[test]
    fn a_huge_rank_or_batch_saturates_instead_of_wrapping() {
        let dense = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        let max = u32::MAX as usize;
        assert_eq!(train_memory(&dense, max, max, 256).total, u64::MAX);
        assert_eq!(train_memory(&dense, usize::MAX, 4, 256).total, u64::MAX);
        let big = train_memory(&dense, 4, max, 4096).total;
        assert!(big > train_memory(&dense, 4, 4, 256).total * 1000, "{big}");
    }
}
