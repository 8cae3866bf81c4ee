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
    /// largest shape: pruning only shrinks the model).
    fn round_memory(&self, kept: &KeptIndices, rank: usize, batch: usize) -> u64 {
        train_memory(&self.shape(kept), rank, batch, self.seq_len()).total
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
    pub weights: u64,
    pub adapter_and_optimizer: u64,
    pub activations: u64,
    pub total: u64,
}

/// Peak training memory: f32 weights, the adapter with its gradient and two AdamW moments,
/// and the activations kept for the backward pass (per block: inputs of every matmul, the
/// attention probabilities, the SwiGLU intermediates), plus one logit chunk.
pub fn train_memory(cfg: &ModelConfig, rank: usize, batch: usize, seq: usize) -> MemoryEstimate {
    let f = 4u64;
    let weights = cfg.total_params() as u64 * f;
    let tokens = (batch * seq) as u64;
    let d = cfg.d_model as u64;
    let hd = cfg.head_dim as u64;
    let mut adapter = 0u64;
    let mut act = 0u64;
    for b in &cfg.blocks {
        let (q, kv, ffn) = (
            b.n_heads as u64 * hd,
            b.n_kv_heads as u64 * hd,
            b.ffn_dim as u64,
        );
        adapter += rank as u64 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ffn) + (ffn + d));
        // normed inputs (2x d), q/k/v, attention output, probabilities, gate/up/act/product
        act += tokens * (4 * d + 2 * q + 2 * kv + 4 * ffn)
            + (batch * seq * seq) as u64 * b.n_heads as u64;
        act += tokens * rank as u64 * 7;
    }
    let adapter_and_optimizer = adapter * f * 4;
    let logits_chunk = crate::eval::LOGIT_CHUNK_ROWS as u64 * cfg.vocab_size as u64 * 3;
    let activations = (act + logits_chunk) * f;
    MemoryEstimate {
        weights,
        adapter_and_optimizer,
        activations,
        total: weights + adapter_and_optimizer + activations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
