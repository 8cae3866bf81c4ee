//! Structural checks of received payloads (shapes against kept indices and rank, finiteness,
//! norm bounds) so a malformed update is refused before it touches any state.

use std::collections::HashSet;

use crate::adapter::{kept_shape, AdapterPayload, KeptIndices, ModelDims, Proj, Tensor2};
use crate::message::{RejectReason, Update};

/// Bounds a payload must respect beyond its shapes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValidationLimits {
    /// Largest LoRA rank accepted.
    pub max_rank: u32,
    /// Largest Frobenius norm of a single factor (`A` or `B` of one layer).
    pub max_factor_norm: f64,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_rank: 256,
            max_factor_norm: 1.0e4,
        }
    }
}

/// Which factor of a layer a check failed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

impl std::fmt::Display for Factor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Factor::A => "A",
            Factor::B => "B",
        })
    }
}

/// Why a payload failed validation.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("model dimensions are inconsistent: {0:?}")]
    InconsistentDims(ModelDims),
    #[error("kept indices cover {got} blocks, the model has {expected}")]
    BlockCount { expected: usize, got: usize },
    #[error("block {block}: {what}")]
    KeptIndices { block: usize, what: String },
    #[error("rank {rank} is outside 1..={max}")]
    Rank { rank: u32, max: u32 },
    #[error("alpha {0} is not a positive finite number")]
    Alpha(f32),
    #[error("layer block {block} is out of range (model has {n_blocks} blocks)")]
    BlockOutOfRange { block: u32, n_blocks: u32 },
    #[error("layer {block}.{proj} appears twice")]
    DuplicateLayer { block: u32, proj: Proj },
    #[error("layer {block}.{proj} factor {factor}: shape {got:?}, expected {expected:?}")]
    Shape {
        block: u32,
        proj: Proj,
        factor: Factor,
        expected: (usize, usize),
        got: (u32, u32),
    },
    #[error("layer {block}.{proj} factor {factor}: {got} values for a {rows}x{cols} matrix")]
    DataLength {
        block: u32,
        proj: Proj,
        factor: Factor,
        rows: u32,
        cols: u32,
        got: usize,
    },
    #[error("layer {block}.{proj} factor {factor} holds non-finite values")]
    NonFinite {
        block: u32,
        proj: Proj,
        factor: Factor,
    },
    #[error("layer {block}.{proj} factor {factor}: norm {norm} exceeds {limit}")]
    NormTooLarge {
        block: u32,
        proj: Proj,
        factor: Factor,
        norm: f64,
        limit: f64,
    },
    #[error("statistic {name} is invalid: {value}")]
    Stat { name: &'static str, value: f64 },
}

impl ValidationError {
    /// The reason to send back to the device.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            ValidationError::NonFinite { .. } => RejectReason::NonFinite,
            ValidationError::NormTooLarge { norm, limit, .. } => RejectReason::NormTooLarge {
                norm: *norm,
                limit: *limit,
            },
            other => RejectReason::Malformed(other.to_string()),
        }
    }
}

fn strictly_increasing_below(values: &[u32], bound: u32) -> bool {
    values.windows(2).all(|w| w[0] < w[1]) && values.last().is_none_or(|&v| v < bound)
}

/// Checks model dimensions for internal consistency.
pub fn validate_dims(dims: &ModelDims) -> Result<(), ValidationError> {
    if dims.is_consistent() {
        Ok(())
    } else {
        Err(ValidationError::InconsistentDims(*dims))
    }
}

/// Checks kept-index maps: one entry per block, sorted unique in-range indices, and the kept KV
/// heads exactly those read by a kept query head.
pub fn validate_kept(dims: &ModelDims, kept: &KeptIndices) -> Result<(), ValidationError> {
    validate_dims(dims)?;
    if kept.blocks.len() != dims.n_blocks as usize {
        return Err(ValidationError::BlockCount {
            expected: dims.n_blocks as usize,
            got: kept.blocks.len(),
        });
    }
    for (block, b) in kept.blocks.iter().enumerate() {
        let bad = |what: &str| ValidationError::KeptIndices {
            block,
            what: what.to_string(),
        };
        if !strictly_increasing_below(&b.query_heads, dims.n_heads) {
            return Err(bad(
                "query heads are not sorted unique indices below n_heads",
            ));
        }
        if !strictly_increasing_below(&b.kv_heads, dims.n_kv_heads) {
            return Err(bad(
                "kv heads are not sorted unique indices below n_kv_heads",
            ));
        }
        if !strictly_increasing_below(&b.mlp_channels, dims.ffn) {
            return Err(bad("mlp channels are not sorted unique indices below ffn"));
        }
        let mut needed: Vec<u32> = b.query_heads.iter().map(|&q| dims.kv_head_of(q)).collect();
        needed.dedup();
        if needed != b.kv_heads {
            return Err(bad(
                "kv heads differ from the set read by the kept query heads",
            ));
        }
    }
    Ok(())
}

fn check_factor(
    block: u32,
    proj: Proj,
    factor: Factor,
    t: &Tensor2,
    expected: (usize, usize),
    limits: &ValidationLimits,
) -> Result<(), ValidationError> {
    if (t.rows as usize, t.cols as usize) != expected {
        return Err(ValidationError::Shape {
            block,
            proj,
            factor,
            expected,
            got: (t.rows, t.cols),
        });
    }
    if t.data.len() != t.numel() {
        return Err(ValidationError::DataLength {
            block,
            proj,
            factor,
            rows: t.rows,
            cols: t.cols,
            got: t.data.len(),
        });
    }
    if !t.data.all_finite() {
        return Err(ValidationError::NonFinite {
            block,
            proj,
            factor,
        });
    }
    let norm = t.frobenius();
    if norm > limits.max_factor_norm {
        return Err(ValidationError::NormTooLarge {
            block,
            proj,
            factor,
            norm,
            limit: limits.max_factor_norm,
        });
    }
    Ok(())
}

/// Checks an adapter against the model and the device's kept indices: rank and alpha in range,
/// each layer at most once and inside the model, `A` is `[rank, in_kept]`, `B` is
/// `[out_kept, rank]`, buffers as long as their shapes, every value finite, factor norms bounded.
pub fn validate_adapter(
    dims: &ModelDims,
    adapter: &AdapterPayload,
    kept: &KeptIndices,
    limits: &ValidationLimits,
) -> Result<(), ValidationError> {
    validate_kept(dims, kept)?;
    if adapter.rank == 0 || adapter.rank > limits.max_rank {
        return Err(ValidationError::Rank {
            rank: adapter.rank,
            max: limits.max_rank,
        });
    }
    if !(adapter.alpha.is_finite() && adapter.alpha > 0.0) {
        return Err(ValidationError::Alpha(adapter.alpha));
    }
    let rank = adapter.rank as usize;
    let mut seen = HashSet::with_capacity(adapter.layers.len());
    for layer in &adapter.layers {
        if layer.block >= dims.n_blocks {
            return Err(ValidationError::BlockOutOfRange {
                block: layer.block,
                n_blocks: dims.n_blocks,
            });
        }
        if !seen.insert((layer.block, layer.proj)) {
            return Err(ValidationError::DuplicateLayer {
                block: layer.block,
                proj: layer.proj,
            });
        }
        let (out, inp) = kept_shape(dims, layer.proj, &kept.blocks[layer.block as usize]);
        check_factor(
            layer.block,
            layer.proj,
            Factor::A,
            &layer.a,
            (rank, inp),
            limits,
        )?;
        check_factor(
            layer.block,
            layer.proj,
            Factor::B,
            &layer.b,
            (out, rank),
            limits,
        )?;
    }
    Ok(())
}

/// Checks a whole update: the adapter (see [`validate_adapter`]) and its statistics (finite
/// losses, sparsity in `[0, 1]`).
pub fn validate_update(
    dims: &ModelDims,
    update: &Update,
    limits: &ValidationLimits,
) -> Result<(), ValidationError> {
    let s = &update.stats;
    for (name, value) in [("loss_pre", s.loss_pre), ("loss_post", s.loss_post)] {
        if !value.is_finite() || value < 0.0 {
            return Err(ValidationError::Stat {
                name,
                value: value as f64,
            });
        }
    }
    if !(0.0..=1.0).contains(&s.sparsity) {
        return Err(ValidationError::Stat {
            name: "sparsity",
            value: s.sparsity as f64,
        });
    }
    validate_adapter(dims, &update.adapter, &update.kept, limits)
}
