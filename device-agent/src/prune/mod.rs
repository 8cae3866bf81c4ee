//! Structured pruning: which attention heads and MLP channels of each block are kept (as
//! indices into the dense base model) and physical slicing of the base weights and of
//! LoRA-shaped tensors to those indices (this file); group importance scores and the
//! device's importance EMA ([`scores`]); the choice of units to remove toward a sparsity
//! target ([`select`]); the model a device holds, sliced to its maps ([`HeldModel`]).
//!
//! Coupled groups:
//! - MLP channel j: column j of gate and up, row j of down (and the matching LoRA slices).
//! - Query head h: its `head_dim` columns of q and rows of o. A KV head goes when no kept query
//!   head reads it; kept query heads keep reading their own KV head through the block's
//!   query -> KV map (see [`BlockShape::q_to_kv`]).
//! - KV head g: its `head_dim` columns of k and v. It is scored on its own (k and v count in
//!   the importance), and the ranking splits its score and its parameters evenly among the
//!   kept query heads that read it; it goes with the last of them.
//!
//! Embeddings, norms and the LM head are never pruned.
//!
//! Kept-index maps are the wire's own types, [`protocol::KeptIndices`] (one [`BlockKept`] per
//! block); [`KeptIndicesExt`] reads them against a dense [`ModelConfig`].

mod held;
mod scores;
mod select;

use burn::tensor::{Int, Tensor, TensorData};
use protocol::{BlockKept, KeptIndices, Proj};

use crate::model::{Block, BlockShape, Llama, ModelConfig};

pub use held::HeldModel;

pub use scores::{
    group_scores, group_sums, magnitude_scores, random_scores, scores_rng, slice_scores, sum_along,
    BlockScores, Criterion, Importance,
};
pub use select::{channel_cost, head_cost, kv_cost, params_of, select_prune, PruneConfig};

/// Errors in pruning inputs.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("kept-index maps have {got} blocks, the model has {want}")]
    BlockCount { got: usize, want: usize },
    #[error(
        "block {block}: kept {what} index {index} is out of range (< {limit}) or not ascending"
    )]
    BadIndex {
        block: usize,
        what: &'static str,
        index: usize,
        limit: usize,
    },
    #[error(
        "block {block}: kept KV heads {kv:?} do not match those read by kept query heads {want:?}"
    )]
    KvMismatch {
        block: usize,
        kv: Vec<u32>,
        want: Vec<u32>,
    },
    #[error("block {block}: the importance state holds {got} {what} scores, the kept maps {want}")]
    ImportanceShape {
        block: usize,
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("block {block}: {what} {index} is not among the units the model still holds")]
    NotSubset {
        block: usize,
        what: &'static str,
        index: u32,
    },
    #[error("the model's block shapes are not those of the kept maps it is said to hold")]
    NotHeld,
    #[error(
        "block {block}: an importance {what} score is {value}, not a finite non-negative number"
    )]
    ImportanceValue {
        block: usize,
        what: &'static str,
        value: f64,
    },
}

/// Kept-index maps read against the dense model's config.
pub trait KeptIndicesExt: Sized {
    /// Everything kept.
    fn dense(cfg: &ModelConfig) -> Self;
    /// Check the maps against the dense config.
    fn validate(&self, cfg: &ModelConfig) -> Result<(), PruneError>;
    /// Block shapes these maps give a dense config.
    fn shapes(&self, cfg: &ModelConfig) -> Vec<BlockShape>;
    /// Non-embedding sparsity of the dense config pruned to these maps (what
    /// `pruned.sparsity()` gives, without building the shapes).
    fn sparsity(&self, cfg: &ModelConfig) -> f64;
}

/// Dense KV head read by dense query head `h`.
pub fn kv_of(cfg: &ModelConfig, h: u32) -> u32 {
    h / (cfg.n_heads / cfg.n_kv_heads.max(1)).max(1) as u32
}

/// `0..n` as kept indices.
fn all_of(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

impl KeptIndicesExt for KeptIndices {
    fn sparsity(&self, cfg: &ModelConfig) -> f64 {
        // The pruned config's `blocks` has one entry per kept block, so its dense count is
        // this one (`dense_non_embedding_params` counts `blocks.len()` blocks).
        let dense = cfg.non_embedding_params_of(
            self.blocks
                .iter()
                .map(|_| (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim)),
        );
        1.0 - params_of(cfg, self) as f64 / dense as f64
    }

    fn dense(cfg: &ModelConfig) -> Self {
        KeptIndices {
            blocks: (0..cfg.n_layers())
                .map(|_| BlockKept {
                    query_heads: all_of(cfg.n_heads),
                    kv_heads: all_of(cfg.n_kv_heads),
                    mlp_channels: all_of(cfg.ffn_dim),
                })
                .collect(),
        }
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<(), PruneError> {
        if self.blocks.len() != cfg.n_layers() {
            return Err(PruneError::BlockCount {
                got: self.blocks.len(),
                want: cfg.n_layers(),
            });
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for (what, v, limit) in [
                ("head", &b.query_heads, cfg.n_heads),
                ("kv head", &b.kv_heads, cfg.n_kv_heads),
                ("channel", &b.mlp_channels, cfg.ffn_dim),
            ] {
                for (k, &x) in v.iter().enumerate() {
                    if x as usize >= limit || (k > 0 && v[k - 1] >= x) {
                        return Err(PruneError::BadIndex {
                            block: i,
                            what,
                            index: x as usize,
                            limit,
                        });
                    }
                }
            }
            let mut want: Vec<u32> = b.query_heads.iter().map(|&h| kv_of(cfg, h)).collect();
            want.dedup();
            if want != b.kv_heads {
                return Err(PruneError::KvMismatch {
                    block: i,
                    kv: b.kv_heads.clone(),
                    want,
                });
            }
        }
        Ok(())
    }

    fn shapes(&self, cfg: &ModelConfig) -> Vec<BlockShape> {
        self.blocks
            .iter()
            .map(|b| BlockShape {
                n_heads: b.query_heads.len(),
                n_kv_heads: b.kv_heads.len(),
                ffn_dim: b.mlp_channels.len(),
                q_to_kv: b
                    .query_heads
                    .iter()
                    .map(|&h| {
                        let kv = kv_of(cfg, h);
                        b.kv_heads
                            .iter()
                            .position(|&k| k == kv)
                            .expect("validated maps")
                    })
                    .collect(),
            })
            .collect()
    }
}

fn idx_tensor(idx: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// Element indices of whole heads: head `h` covers `h*hd .. (h+1)*hd` (`heads` are dense head
/// indices or local head positions).
pub fn head_elems(heads: &[usize], head_dim: usize) -> Vec<usize> {
    heads
        .iter()
        .flat_map(|&h| h * head_dim..(h + 1) * head_dim)
        .collect()
}

/// Keep `idx` along `dim` (returns the tensor itself when nothing is removed).
pub fn keep(t: Tensor<2>, dim: usize, idx: &[usize]) -> Tensor<2> {
    if idx.len() == t.dims()[dim] && idx.iter().enumerate().all(|(i, &x)| i == x) {
        return t;
    }
    let device = t.device();
    t.select(dim, idx_tensor(idx, &device))
}

/// Slice the dense base model to the kept units (a copy; the base stays as it is). Blocks that
/// keep everything share the base's tensors, so a 0% prune is bit-identical to the dense model.
pub fn slice_model(base: &Llama, kept: &KeptIndices) -> Result<Llama, PruneError> {
    let mut m = base.clone();
    narrow(&mut m, &KeptIndices::dense(&base.config), kept)?;
    Ok(m)
}

/// Prune `model`, now sliced to `from`, down to `to` in place: each block's weights are replaced
/// by the rows and columns `to` keeps, and the old ones are dropped as it goes (a device never
/// holds more than its model plus one block). `to` must be a subset of `from`; both are read
/// against the dense dims the model's config carries.
pub fn narrow(model: &mut Llama, from: &KeptIndices, to: &KeptIndices) -> Result<(), PruneError> {
    let cfg = model.config.clone();
    from.validate(&cfg)?;
    to.validate(&cfg)?;
    if from.shapes(&cfg) != cfg.blocks {
        return Err(PruneError::NotHeld);
    }
    for (block, (o, n)) in from.blocks.iter().zip(&to.blocks).enumerate() {
        for (what, old, new) in [
            ("head", &o.query_heads, &n.query_heads),
            ("kv head", &o.kv_heads, &n.kv_heads),
            ("channel", &o.mlp_channels, &n.mlp_channels),
        ] {
            if let Some(&index) = new.iter().find(|x| old.binary_search(x).is_err()) {
                return Err(PruneError::NotSubset { block, what, index });
            }
        }
    }
    let hd = cfg.head_dim;
    let mut changed = false;
    for (l, (shape, (o, n))) in to
        .shapes(&cfg)
        .into_iter()
        .zip(from.blocks.iter().zip(&to.blocks))
        .enumerate()
    {
        if o == n {
            continue;
        }
        changed = true;
        let q_cols = head_elems(&local_positions(&o.query_heads, &n.query_heads), hd);
        let kv_cols = head_elems(&local_positions(&o.kv_heads, &n.kv_heads), hd);
        let channels = local_positions(&o.mlp_channels, &n.mlp_channels);
        // A Q8_0 base's block in fp32 for the slice (`set_block` quantizes it again).
        let src = &model.fp32_block(l);
        let block = Block {
            attn_norm: src.attn_norm.clone(),
            wq: keep(src.wq.clone(), 1, &q_cols),
            wk: keep(src.wk.clone(), 1, &kv_cols),
            wv: keep(src.wv.clone(), 1, &kv_cols),
            wo: keep(src.wo.clone(), 0, &q_cols),
            ffn_norm: src.ffn_norm.clone(),
            w_gate: keep(src.w_gate.clone(), 1, &channels),
            w_up: keep(src.w_up.clone(), 1, &channels),
            w_down: keep(src.w_down.clone(), 0, &channels),
        };
        model.set_block(l, block, shape);
    }
    if changed {
        // The dropped rows go back to the system, not just to the allocator's free lists.
        crate::quant::release_freed_memory();
    }
    Ok(())
}

/// For a tensor shaped like projection `p`'s LoRA factor (`a: [in, r]`, `b: [r, out]`), which
/// dim follows the pruned units, and in what unit (heads in `head_dim` elements, channels).
pub fn factor_pruned_dim(p: Proj, is_a: bool) -> Option<(usize, Unit)> {
    match (p, is_a) {
        (Proj::Q, false) => Some((1, Unit::Head)),
        (Proj::K | Proj::V, false) => Some((1, Unit::KvHead)),
        (Proj::O, true) => Some((0, Unit::Head)),
        (Proj::Gate | Proj::Up, false) => Some((1, Unit::Channel)),
        (Proj::Down, true) => Some((0, Unit::Channel)),
        _ => None,
    }
}

/// Kinds of structured unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Head,
    KvHead,
    Channel,
}

/// Whether every unit `inner` keeps is kept by `outer` too.
pub fn block_within(inner: &BlockKept, outer: &BlockKept) -> bool {
    let within = |i: &[u32], o: &[u32]| i.iter().all(|x| o.binary_search(x).is_ok());
    within(&inner.query_heads, &outer.query_heads)
        && within(&inner.kv_heads, &outer.kv_heads)
        && within(&inner.mlp_channels, &outer.mlp_channels)
}

/// Local positions (in `old`) of the entries that `new` keeps; `new` must be a subset of `old`.
pub fn local_positions(old: &[u32], new: &[u32]) -> Vec<usize> {
    new.iter()
        .map(|x| {
            old.binary_search(x)
                .expect("new kept set is a subset of the old")
        })
        .collect()
}

/// Slice a LoRA-shaped tensor of block `l`, projection `p` from `old` to `new` kept maps.
pub fn slice_factor(
    t: Tensor<2>,
    p: Proj,
    is_a: bool,
    old: &BlockKept,
    new: &BlockKept,
    head_dim: usize,
) -> Tensor<2> {
    match factor_pruned_dim(p, is_a) {
        None => t,
        Some((dim, unit)) => {
            let pos = match unit {
                Unit::Head => head_elems(
                    &local_positions(&old.query_heads, &new.query_heads),
                    head_dim,
                ),
                Unit::KvHead => {
                    head_elems(&local_positions(&old.kv_heads, &new.kv_heads), head_dim)
                }
                Unit::Channel => local_positions(&old.mlp_channels, &new.mlp_channels),
            };
            keep(t, dim, &pos)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::to_rows;
    use burn::tensor::Device;

    #[test]
    fn zero_prune_is_bit_identical() {
        let mut c = ModelConfig::dense(50, 32, 4, 4, 2, 8, 64, true);
        c.max_seq_len = 32;
        let m = Llama::random(c, 1, &Device::flex());
        let s = slice_model(&m, &KeptIndices::dense(&m.config)).unwrap();
        let t = m.tokens_tensor(&[vec![1, 2, 3, 4, 5]]);
        assert_eq!(
            to_rows(m.forward(t.clone(), None)),
            to_rows(s.forward(t, None))
        );
    }

    #[test]
    fn sparsity_and_params_from_the_maps_equal_the_pruned_configs() {
        let c = ModelConfig::dense(50, 32, 4, 4, 2, 8, 64, true);
        let mut kept = KeptIndices::dense(&c);
        let pruned = |k: &KeptIndices| {
            let mut p = c.clone();
            p.blocks = k.shapes(&c);
            p
        };
        assert_eq!(kept.sparsity(&c), 0.0);
        // Heads, a whole KV group and channels out of different blocks.
        kept.blocks[1].query_heads = vec![0, 1, 3];
        kept.blocks[2].query_heads = vec![0, 1];
        kept.blocks[2].kv_heads = vec![0];
        kept.blocks[3].mlp_channels.truncate(17);
        let p = pruned(&kept);
        assert_eq!(params_of(&c, &kept), p.non_embedding_params());
        assert_eq!(kept.sparsity(&c).to_bits(), p.sparsity().to_bits());
        assert!(kept.sparsity(&c) > 0.0);
        // The aggregator's derivation from the maps alone gives the same bits.
        let dims = crate::wire::dims_of(&c);
        assert_eq!(
            protocol::KeptIndices::non_embedding_sparsity(&kept, &dims).to_bits(),
            p.sparsity().to_bits()
        );
        assert_eq!(
            protocol::KeptIndices::non_embedding_sparsity(&KeptIndices::dense(&c), &dims),
            0.0
        );
    }
}
