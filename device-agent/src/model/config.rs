//! Model hyper-parameters: [`ModelConfig`] for a LLaMA-family decoder and [`BlockShape`], the
//! head and channel counts of one block (which differ between blocks once pruned).

use serde::{Deserialize, Serialize};

/// Shape of one decoder block after any pruning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockShape {
    /// Query heads kept in this block.
    pub n_heads: usize,
    /// KV heads kept in this block.
    pub n_kv_heads: usize,
    /// MLP intermediate channels kept in this block.
    pub ffn_dim: usize,
    /// For each kept query head, the index (among this block's kept KV heads) it reads.
    pub q_to_kv: Vec<usize>,
}

impl BlockShape {
    /// The unpruned shape: query head h reads KV head h / (n_heads / n_kv_heads).
    pub fn dense(n_heads: usize, n_kv_heads: usize, ffn_dim: usize) -> Self {
        let group = n_heads / n_kv_heads.max(1);
        BlockShape {
            n_heads,
            n_kv_heads,
            ffn_dim,
            q_to_kv: (0..n_heads).map(|h| h / group.max(1)).collect(),
        }
    }

    /// Whether query heads map onto KV heads in equal consecutive groups (what llama.cpp and
    /// stock HF transformers assume).
    pub fn uniform_groups(&self) -> bool {
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return false;
        }
        let g = self.n_heads / self.n_kv_heads;
        self.q_to_kv.iter().enumerate().all(|(h, &kv)| kv == h / g)
    }
}

/// The largest hyper-parameters a model file may claim. A file's counts size allocations and
/// loops before its tensors are read, so they are checked against these first: each is well
/// above any LLaMA-family model that fits a device (a 70B model has 80 blocks of 64 heads of
/// 128, width 8,192, 28,672 channels; the largest vocabularies are about 256,000 tokens).
pub mod limits {
    pub const MAX_LAYERS: usize = 512;
    pub const MAX_HEADS: usize = 512;
    pub const MAX_HEAD_DIM: usize = 1024;
    /// The model width and the MLP's channels.
    pub const MAX_WIDTH: usize = 1 << 17;
    pub const MAX_VOCAB: usize = 1 << 21;
    /// Positions the rotary tables are built for (loaders cap a file's context at 8,192).
    pub const MAX_CONTEXT: usize = 1 << 16;
}

/// `value` of `what` as a count in `min..=max`, or what is wrong with it.
pub fn checked_count(what: &str, value: u64, min: usize, max: usize) -> Result<usize, String> {
    usize::try_from(value)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| format!("{what} is {value}, outside {min}..={max}"))
}

/// Hyper-parameters of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub head_dim: usize,
    /// Query heads of the unpruned model (per block).
    pub n_heads: usize,
    /// KV heads of the unpruned model (per block).
    pub n_kv_heads: usize,
    /// MLP width of the unpruned model (per block).
    pub ffn_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub max_seq_len: usize,
    pub tie_embeddings: bool,
    /// Actual per-block shapes (equal to the dense shape unless pruned).
    pub blocks: Vec<BlockShape>,
}

impl ModelConfig {
    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Every hyper-parameter within [`limits`] and consistent (an even head width for the
    /// rotary embedding, positive finite norm epsilon and rotary base, each block's query
    /// heads mapped onto its own KV heads), or the first that is not: what a model file gave
    /// is checked here before a model is built from it.
    pub fn check(&self) -> Result<(), String> {
        use limits::*;
        let count = |what: &str, v: usize, min: usize, max: usize| {
            checked_count(what, v as u64, min, max).map(|_| ())
        };
        count("the block count", self.blocks.len(), 1, MAX_LAYERS)?;
        count("the vocabulary size", self.vocab_size, 1, MAX_VOCAB)?;
        count("the model width", self.d_model, 1, MAX_WIDTH)?;
        count("the head width", self.head_dim, 2, MAX_HEAD_DIM)?;
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "the head width is {}: the rotary embedding needs an even one",
                self.head_dim
            ));
        }
        count("the query head count", self.n_heads, 1, MAX_HEADS)?;
        count("the KV head count", self.n_kv_heads, 1, MAX_HEADS)?;
        count("the MLP width", self.ffn_dim, 1, MAX_WIDTH)?;
        count("the context length", self.max_seq_len, 1, MAX_CONTEXT)?;
        for (what, v) in [
            ("RMSNorm epsilon", self.rms_eps),
            ("rotary base", self.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("the {what} is {v}: it must be positive and finite"));
            }
        }
        for (i, s) in self.blocks.iter().enumerate() {
            count(&format!("block {i}'s query heads"), s.n_heads, 0, MAX_HEADS)?;
            count(&format!("block {i}'s KV heads"), s.n_kv_heads, 0, MAX_HEADS)?;
            count(
                &format!("block {i}'s MLP channels"),
                s.ffn_dim,
                0,
                MAX_WIDTH,
            )?;
            if s.q_to_kv.len() != s.n_heads || s.q_to_kv.iter().any(|&k| k >= s.n_kv_heads) {
                return Err(format!("block {i}: query->KV map {:?} invalid", s.q_to_kv));
            }
        }
        Ok(())
    }

    /// A dense config with `n_layers` identical blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        vocab_size: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        ffn_dim: usize,
        tie_embeddings: bool,
    ) -> Self {
        ModelConfig {
            vocab_size,
            d_model,
            head_dim,
            n_heads,
            n_kv_heads,
            ffn_dim,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            max_seq_len: 2048,
            tie_embeddings,
            blocks: vec![BlockShape::dense(n_heads, n_kv_heads, ffn_dim); n_layers],
        }
    }

    /// Parameters outside the embedding table and LM head (what sparsity is measured on).
    pub fn non_embedding_params(&self) -> usize {
        self.non_embedding_params_of(
            self.blocks
                .iter()
                .map(|b| (b.n_heads, b.n_kv_heads, b.ffn_dim)),
        )
    }

    /// [`Self::non_embedding_params`] of this architecture with blocks of these (query heads,
    /// KV heads, channels) counts, without building their shapes.
    pub fn non_embedding_params_of(
        &self,
        blocks: impl IntoIterator<Item = (usize, usize, usize)>,
    ) -> usize {
        blocks
            .into_iter()
            .map(|(h, kv, f)| self.block_params(h, kv, f))
            .sum::<usize>()
            + self.d_model
    }

    /// Parameters of one block with these head and channel counts (two norms, the four
    /// attention projections, the three MLP projections).
    fn block_params(&self, n_heads: usize, n_kv_heads: usize, ffn_dim: usize) -> usize {
        let (d, hd) = (self.d_model, self.head_dim);
        2 * d + d * n_heads * hd * 2 + d * n_kv_heads * hd * 2 + 3 * d * ffn_dim
    }

    /// All parameters (embedding counted once when tied).
    pub fn total_params(&self) -> usize {
        let emb = self.vocab_size * self.d_model;
        self.non_embedding_params() + if self.tie_embeddings { emb } else { 2 * emb }
    }

    /// Parameters of the same architecture before pruning.
    pub fn dense_non_embedding_params(&self) -> usize {
        self.blocks.len() * self.block_params(self.n_heads, self.n_kv_heads, self.ffn_dim)
            + self.d_model
    }

    /// Fraction of non-embedding parameters removed relative to the dense architecture.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.non_embedding_params() as f64 / self.dense_non_embedding_params() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_counts_match_smollm2() {
        let c = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        // 134,515,008 parameters in SmolLM2-135M.
        assert_eq!(c.total_params(), 134_515_008);
        assert_eq!(c.sparsity(), 0.0);
        // Pruned: the dense count is the architecture's, whatever the blocks now hold.
        let mut p = c.clone();
        p.blocks[3] = BlockShape::dense(6, 2, 1000);
        assert_eq!(p.dense_non_embedding_params(), c.non_embedding_params());
        let removed = 576 * 64 * 2 * 3 + 576 * 64 * 2 + 3 * 576 * 536;
        assert_eq!(c.non_embedding_params() - p.non_embedding_params(), removed);
        assert!((p.sparsity() - removed as f64 / c.non_embedding_params() as f64).abs() < 1e-15);
    }
}
