//! Structured pruning: which attention heads and MLP channels of each block are kept (as
//! indices into the dense base model), physical slicing of the base weights and of LoRA-shaped
//! tensors to those indices, group importance scores (LoRA-gradient, weight magnitude,
//! full-gradient Taylor, random), and the choice of units to remove toward a sparsity target.
//!
//! Coupled groups:
//! - MLP channel j: column j of gate and up, row j of down (and the matching LoRA slices).
//! - Query head h: its `head_dim` columns of q and rows of o. A KV head goes when no kept query
//!   head reads it; kept query heads keep reading their own KV head through the block's
//!   query -> KV map (see [`BlockShape::q_to_kv`]).
//! Embeddings, norms and the LM head are never pruned.
//!
//! Kept-index maps are the wire's own types, [`protocol::KeptIndices`] (one [`BlockKept`] per
//! block); [`KeptIndicesExt`] reads them against a dense [`ModelConfig`].

use burn::tensor::{Int, Tensor, TensorData};
use protocol::{BlockKept, KeptIndices, Proj};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{Block, BlockShape, Llama, ModelConfig};

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
}

/// Kept-index maps read against the dense model's config.
pub trait KeptIndicesExt: Sized {
    /// Everything kept.
    fn dense(cfg: &ModelConfig) -> Self;
    /// Check the maps against the dense config.
    fn validate(&self, cfg: &ModelConfig) -> Result<(), PruneError>;
    /// Block shapes these maps give a dense config.
    fn shapes(&self, cfg: &ModelConfig) -> Vec<BlockShape>;
}

/// Dense KV head read by dense query head `h`.
pub fn kv_of(cfg: &ModelConfig, h: u32) -> u32 {
    h / (cfg.n_heads / cfg.n_kv_heads.max(1)).max(1) as u32
}

/// `0..n` as kept indices.
fn all_of(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// Kept indices as `usize` positions.
fn positions(idx: &[u32]) -> Vec<usize> {
    idx.iter().map(|&i| i as usize).collect()
}

impl KeptIndicesExt for KeptIndices {
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

/// Slice the dense base model to the kept units. Blocks that keep everything share the base's
/// tensors, so a 0% prune is bit-identical to the dense model.
pub fn slice_model(base: &Llama, kept: &KeptIndices) -> Result<Llama, PruneError> {
    let cfg = &base.config;
    kept.validate(cfg)?;
    let hd = cfg.head_dim;
    let shapes = kept.shapes(cfg);
    let mut m = base.clone();
    for (l, (b, shape)) in kept.blocks.iter().zip(shapes).enumerate() {
        let src = &base.blocks[l];
        let q_cols = head_elems(&positions(&b.query_heads), hd);
        let kv_cols = head_elems(&positions(&b.kv_heads), hd);
        let channels = positions(&b.mlp_channels);
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
        m.set_block(l, block, shape);
    }
    Ok(m)
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

/// Importance criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// `|G ⊙ (W0 + s B A)|` with `G` estimated from LoRA gradients (LoRAPrune).
    #[default]
    LoraGradient,
    /// `|W ⊙ dL/dW|` with the full weight gradient (first-order Taylor).
    Taylor,
    /// `|W|`.
    Magnitude,
    /// Uniform random scores (a baseline).
    Random,
}

impl std::str::FromStr for Criterion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lora-gradient" | "lora" => Ok(Self::LoraGradient),
            "taylor" => Ok(Self::Taylor),
            "magnitude" => Ok(Self::Magnitude),
            "random" => Ok(Self::Random),
            o => Err(format!(
                "unknown criterion '{o}' (lora-gradient, taylor, magnitude, random)"
            )),
        }
    }
}

/// Group scores of one block: one per kept query head and per kept channel (local order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockScores {
    pub heads: Vec<f64>,
    pub channels: Vec<f64>,
}

/// Per-element importance matrices of a block's five prunable projections (`[in, out]`),
/// summed into group scores.
pub fn group_scores(
    q: Tensor<2>,
    o: Tensor<2>,
    gate: Tensor<2>,
    up: Tensor<2>,
    down: Tensor<2>,
    head_dim: usize,
) -> BlockScores {
    let [_, qo] = q.dims();
    let nh = qo / head_dim.max(1);
    let heads = if nh == 0 {
        Vec::new()
    } else {
        let qs = q
            .sum_dim(0)
            .reshape([nh, head_dim])
            .sum_dim(1)
            .reshape([nh]);
        let os = o
            .sum_dim(1)
            .reshape([nh, head_dim])
            .sum_dim(1)
            .reshape([nh]);
        host_f64(qs + os)
    };
    let [_, f] = gate.dims();
    let channels = if f == 0 {
        Vec::new()
    } else {
        let cs = gate.sum_dim(0).reshape([f])
            + up.sum_dim(0).reshape([f])
            + down.sum_dim(1).reshape([f]);
        host_f64(cs)
    };
    BlockScores { heads, channels }
}

fn host_f64(t: Tensor<1>) -> Vec<f64> {
    let v: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("converted to f32 on the line above");
    v.into_iter().map(f64::from).collect()
}

/// Magnitude scores of a (pruned) model.
pub fn magnitude_scores(m: &Llama) -> Vec<BlockScores> {
    m.blocks
        .iter()
        .map(|b| {
            group_scores(
                b.wq.clone().abs(),
                b.wo.clone().abs(),
                b.w_gate.clone().abs(),
                b.w_up.clone().abs(),
                b.w_down.clone().abs(),
                m.config.head_dim,
            )
        })
        .collect()
}

/// Seeded random scores with the model's current shapes.
pub fn random_scores(m: &Llama, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<BlockScores> {
    m.config
        .blocks
        .iter()
        .map(|s| BlockScores {
            heads: (0..s.n_heads).map(|_| rng.random::<f64>()).collect(),
            channels: (0..s.ffn_dim).map(|_| rng.random::<f64>()).collect(),
        })
        .collect()
}

/// A fresh RNG for random scores.
pub fn scores_rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f_5c0e)
}

/// Pruning policy knobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneConfig {
    /// Blocks never pruned (default: the first and the last).
    pub protected_blocks: Vec<usize>,
    /// Minimum query heads kept per block (>= 1 so every block keeps attention for export).
    pub min_heads_per_block: usize,
    /// Minimum MLP channels kept per block.
    pub min_channels_per_block: usize,
    /// Prune the same number of heads and channels in every block (protected blocks included:
    /// equal counts are the point), heads in equal numbers per KV group, so the model exports
    /// as stock arch `llama` (GGUF) and loads in stock HF transformers.
    pub uniform: bool,
    /// Also prune attention heads (otherwise MLP channels only).
    pub prune_heads: bool,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            protected_blocks: vec![],
            min_heads_per_block: 1,
            min_channels_per_block: 32,
            uniform: false,
            prune_heads: true,
        }
    }
}

impl PruneConfig {
    /// The default with the first and last blocks of an `n_layers` model protected.
    pub fn for_layers(n_layers: usize) -> Self {
        PruneConfig {
            protected_blocks: if n_layers > 2 {
                vec![0, n_layers - 1]
            } else {
                vec![]
            },
            ..Self::default()
        }
    }
}

/// Non-embedding parameters removed by dropping one query head (q columns + o rows).
fn head_cost(cfg: &ModelConfig) -> usize {
    2 * cfg.d_model * cfg.head_dim
}
/// Parameters of one KV head (k and v columns).
fn kv_cost(cfg: &ModelConfig) -> usize {
    2 * cfg.d_model * cfg.head_dim
}
/// Parameters of one MLP channel.
fn channel_cost(cfg: &ModelConfig) -> usize {
    3 * cfg.d_model
}

/// Non-embedding parameter count of the dense config pruned to `kept`.
pub fn params_of(cfg: &ModelConfig, kept: &KeptIndices) -> usize {
    let mut c = cfg.clone();
    c.blocks = kept.shapes(cfg);
    c.non_embedding_params()
}

/// Choose units to remove so that sparsity (over non-embedding parameters of the dense
/// `cfg`) reaches at least `target`, lowest normalised score first, and return the new maps.
/// Scores are per kept unit in local order (as [`BlockScores`]); each block's scores are
/// divided by that block's mean for the unit type, so blocks compare on the same scale.
pub fn select_prune(
    cfg: &ModelConfig,
    kept: &KeptIndices,
    scores: &[BlockScores],
    target: f64,
    pc: &PruneConfig,
) -> KeptIndices {
    let dense = cfg.dense_non_embedding_params() as f64;
    let current = params_of(cfg, kept) as f64;
    let want_removed = (current - (1.0 - target) * dense).max(0.0);
    if want_removed <= 0.0 {
        return kept.clone();
    }
    let prunable: Vec<usize> = (0..kept.blocks.len())
        .filter(|l| !pc.protected_blocks.contains(l))
        .collect();
    let mut new = kept.clone();
    if pc.uniform {
        let all: Vec<usize> = (0..kept.blocks.len()).collect();
        return select_uniform(cfg, kept, scores, want_removed, pc, &all);
    }
    // Candidates: (normalised score, block, is_head, local index).
    let mut cands: Vec<(f64, usize, bool, usize)> = Vec::new();
    for &l in &prunable {
        let s = &scores[l];
        let norm = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            if mean > 0.0 && mean.is_finite() {
                mean
            } else {
                1.0
            }
        };
        let mc = norm(&s.channels);
        cands.extend(
            s.channels
                .iter()
                .enumerate()
                .map(|(i, &x)| (x / mc, l, false, i)),
        );
        if pc.prune_heads {
            let mh = norm(&s.heads);
            cands.extend(
                s.heads
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x / mh, l, true, i)),
            );
        }
    }
    cands.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let mut drop_heads: Vec<Vec<usize>> = vec![Vec::new(); kept.blocks.len()];
    let mut drop_ch: Vec<Vec<usize>> = vec![Vec::new(); kept.blocks.len()];
    let mut removed = 0.0;
    for (_, l, is_head, i) in cands {
        if removed >= want_removed {
            break;
        }
        let b = &kept.blocks[l];
        if is_head {
            if b.query_heads.len() - drop_heads[l].len() <= pc.min_heads_per_block {
                continue;
            }
            drop_heads[l].push(i);
            removed += head_cost(cfg) as f64;
            // A KV head freed by this removal counts too.
            let kv = kv_of(cfg, b.query_heads[i]);
            let still_read = b
                .query_heads
                .iter()
                .enumerate()
                .any(|(j, &h)| !drop_heads[l].contains(&j) && kv_of(cfg, h) == kv);
            if !still_read {
                removed += kv_cost(cfg) as f64;
            }
        } else {
            if b.mlp_channels.len() - drop_ch[l].len() <= pc.min_channels_per_block {
                continue;
            }
            drop_ch[l].push(i);
            removed += channel_cost(cfg) as f64;
        }
    }
    for l in 0..kept.blocks.len() {
        apply_drops(cfg, &mut new.blocks[l], &drop_heads[l], &drop_ch[l]);
    }
    new
}

fn apply_drops(cfg: &ModelConfig, b: &mut BlockKept, heads: &[usize], channels: &[usize]) {
    b.query_heads = b
        .query_heads
        .iter()
        .enumerate()
        .filter(|(i, _)| !heads.contains(i))
        .map(|(_, &h)| h)
        .collect();
    let mut ch_drop = channels.to_vec();
    ch_drop.sort_unstable();
    b.mlp_channels = b
        .mlp_channels
        .iter()
        .enumerate()
        .filter(|(i, _)| ch_drop.binary_search(i).is_err())
        .map(|(_, &c)| c)
        .collect();
    let mut kv: Vec<u32> = b.query_heads.iter().map(|&h| kv_of(cfg, h)).collect();
    kv.dedup();
    b.kv_heads = kv;
}

/// Uniform variant: the same number of heads and channels removed from every prunable block
/// (each block removes its own lowest-scored units).
fn select_uniform(
    cfg: &ModelConfig,
    kept: &KeptIndices,
    scores: &[BlockScores],
    want_removed: f64,
    pc: &PruneConfig,
    prunable: &[usize],
) -> KeptIndices {
    let mut new = kept.clone();
    if prunable.is_empty() {
        return new;
    }
    let n = prunable.len() as f64;
    // Split the budget between heads and channels in proportion to their parameter shares.
    let f_min = prunable
        .iter()
        .map(|&l| kept.blocks[l].mlp_channels.len())
        .min()
        .unwrap_or(0);
    let h_min = prunable
        .iter()
        .map(|&l| kept.blocks[l].query_heads.len())
        .min()
        .unwrap_or(0);
    let attn_params = h_min as f64
        * (head_cost(cfg) as f64
            + kv_cost(cfg) as f64 / (cfg.n_heads / cfg.n_kv_heads.max(1)).max(1) as f64);
    let mlp_params = f_min as f64 * channel_cost(cfg) as f64;
    let share_attn = if pc.prune_heads {
        attn_params / (attn_params + mlp_params).max(1.0)
    } else {
        0.0
    };
    let per_block = want_removed / n;
    // Heads go in equal numbers from every KV group, so query heads still map onto KV heads in
    // equal consecutive groups (what stock runtimes assume).
    let groups = prunable
        .iter()
        .map(|&l| kept.blocks[l].kv_heads.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let heads_per_block = ((per_block * share_attn) / head_cost(cfg) as f64).round() as usize;
    let heads_per_block =
        heads_per_block.min(h_min.saturating_sub(pc.min_heads_per_block.max(groups)));
    let heads_per_block = heads_per_block / groups * groups;
    let head_removed = heads_per_block as f64 * head_cost(cfg) as f64;
    let ch_per_block =
        ((per_block - head_removed).max(0.0) / channel_cost(cfg) as f64).ceil() as usize;
    let ch_per_block = ch_per_block.min(f_min.saturating_sub(pc.min_channels_per_block));
    for &l in prunable {
        let s = &scores[l];
        let lowest = |v: &[f64], k: usize| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        };
        // The lowest-scored heads of each KV group.
        let b = &kept.blocks[l];
        let mut dh = Vec::new();
        for &kv in &b.kv_heads {
            let members: Vec<usize> = (0..b.query_heads.len())
                .filter(|&i| kv_of(cfg, b.query_heads[i]) == kv)
                .collect();
            let sub: Vec<f64> = members.iter().map(|&i| s.heads[i]).collect();
            dh.extend(
                lowest(&sub, heads_per_block / groups)
                    .into_iter()
                    .map(|k| members[k]),
            );
        }
        let dc = lowest(&s.channels, ch_per_block);
        apply_drops(cfg, &mut new.blocks[l], &dh, &dc);
    }
    new
}

/// Slice per-unit score vectors from `old` to `new` kept maps (for EMA state).
pub fn slice_scores(
    scores: &[BlockScores],
    old: &KeptIndices,
    new: &KeptIndices,
) -> Vec<BlockScores> {
    scores
        .iter()
        .zip(old.blocks.iter().zip(&new.blocks))
        .map(|(s, (o, n))| BlockScores {
            heads: local_positions(&o.query_heads, &n.query_heads)
                .iter()
                .map(|&i| s.heads[i])
                .collect(),
            channels: local_positions(&o.mlp_channels, &n.mlp_channels)
                .iter()
                .map(|&i| s.channels[i])
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::to_rows;
    use burn::tensor::Device;

    fn cfg() -> ModelConfig {
        let mut c = ModelConfig::dense(50, 32, 4, 4, 2, 8, 64, true);
        c.max_seq_len = 32;
        c
    }

    #[test]
    fn zero_prune_is_bit_identical() {
        let m = Llama::random(cfg(), 1, &Device::flex());
        let s = slice_model(&m, &KeptIndices::dense(&m.config)).unwrap();
        let t = m.tokens_tensor(&[vec![1, 2, 3, 4, 5]]);
        assert_eq!(
            to_rows(m.forward(t.clone(), None)),
            to_rows(s.forward(t, None))
        );
    }

    #[test]
    fn pruning_reaches_the_planned_count_within_one_group() {
        let c = cfg();
        let kept = KeptIndices::dense(&c);
        let mut rng = scores_rng(3);
        let m = Llama::random(c.clone(), 1, &Device::flex());
        let scores = random_scores(&m, &mut rng);
        let pc = PruneConfig {
            min_channels_per_block: 1,
            ..PruneConfig::for_layers(4)
        };
        for target in [0.1, 0.25, 0.35] {
            let new = select_prune(&c, &kept, &scores, target, &pc);
            new.validate(&c).unwrap();
            let dense = c.dense_non_embedding_params() as f64;
            let planned = (1.0 - target) * dense;
            let got = params_of(&c, &new) as f64;
            // At or below the plan, by less than the largest group (a head plus its KV head).
            assert!(got <= planned + 1e-9, "target {target}: {got} > {planned}");
            assert!(
                planned - got < (head_cost(&c) + kv_cost(&c)) as f64,
                "target {target}: overshoot {}",
                planned - got
            );
            // Protected blocks untouched.
            assert_eq!(new.blocks[0], kept.blocks[0]);
            assert_eq!(new.blocks[3], kept.blocks[3]);
            let pm = slice_model(&m, &new).unwrap();
            assert_eq!(pm.config.non_embedding_params(), got as usize);
            let rows = to_rows(pm.forward(pm.tokens_tensor(&[vec![1, 2, 3]]), None));
            assert!(rows.iter().flatten().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn kv_head_goes_when_no_query_head_reads_it() {
        let c = cfg(); // 4 heads on 2 KV heads: heads 0,1 -> kv 0; 2,3 -> kv 1
        let mut b = KeptIndices::dense(&c).blocks[1].clone();
        apply_drops(&c, &mut b, &[0, 1], &[]);
        assert_eq!(b.query_heads, vec![2, 3]);
        assert_eq!(b.kv_heads, vec![1]);
        let mut b2 = KeptIndices::dense(&c).blocks[1].clone();
        apply_drops(&c, &mut b2, &[1, 3], &[]);
        assert_eq!(b2.kv_heads, vec![0, 1]);
        let mut maps = KeptIndices::dense(&c);
        maps.blocks[1] = b2;
        let shapes = maps.shapes(&c);
        assert_eq!(shapes[1].q_to_kv, vec![0, 1]);
    }

    #[test]
    fn uniform_pruning_keeps_blocks_alike() {
        let c = cfg();
        let m = Llama::random(c.clone(), 2, &Device::flex());
        let scores = magnitude_scores(&m);
        let pc = PruneConfig {
            uniform: true,
            protected_blocks: vec![],
            min_channels_per_block: 1,
            ..PruneConfig::default()
        };
        let new = select_prune(&c, &KeptIndices::dense(&c), &scores, 0.3, &pc);
        let shapes = new.shapes(&c);
        assert!(shapes
            .windows(2)
            .all(|w| w[0].n_heads == w[1].n_heads && w[0].ffn_dim == w[1].ffn_dim));
        assert!(shapes.iter().all(BlockShape::uniform_groups));
        assert!(params_of(&c, &new) < c.dense_non_embedding_params());
    }
}
