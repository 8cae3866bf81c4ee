//! Which units go toward a sparsity target: the pruning policy ([`PruneConfig`]) and
//! [`select_prune`], a cost-aware ranking (importance lost per parameter removed, so a head,
//! about 43 times a channel's parameters in SmolLM2, is weighed against the 43 channels it
//! could spare), globally over the prunable blocks, per block at a uniform ratio (as
//! LoRAPrune), or with equal head and channel counts per block for stock-runtime export.

use protocol::{BlockKept, KeptIndices};
use serde::{Deserialize, Serialize};

use super::{kv_of, BlockScores};
use crate::model::ModelConfig;

/// Pruning policy knobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
    /// Every prunable block loses the same share of its parameters (LoRAPrune's per-layer
    /// ratio), each choosing its own units by importance per parameter; otherwise (the
    /// default) one ranking over all prunable blocks, each block's scores divided by its own
    /// mean importance per parameter. Ignored when `uniform` is set.
    pub per_block: bool,
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
            per_block: false,
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
pub fn head_cost(cfg: &ModelConfig) -> usize {
    2 * cfg.d_model * cfg.head_dim
}
/// Parameters of one KV head (k and v columns).
pub fn kv_cost(cfg: &ModelConfig) -> usize {
    2 * cfg.d_model * cfg.head_dim
}
/// Parameters of one MLP channel.
pub fn channel_cost(cfg: &ModelConfig) -> usize {
    3 * cfg.d_model
}

/// Non-embedding parameter count of the dense config pruned to `kept`.
pub fn params_of(cfg: &ModelConfig, kept: &KeptIndices) -> usize {
    cfg.non_embedding_params_of(
        kept.blocks
            .iter()
            .map(|b| (b.query_heads.len(), b.kv_heads.len(), b.mlp_channels.len())),
    )
}

/// One removable unit: its importance, the parameters it frees, where it is.
#[derive(Debug, Clone, Copy)]
struct Cand {
    score: f64,
    cost: f64,
    /// `score / cost`, the sort key (set by [`sort_by_density`], after any rescaling).
    density: f64,
    block: usize,
    is_head: bool,
    index: usize,
}

/// A block's candidates. A query head carries its own score and cost plus an even share of
/// its KV head's (`1 / readers`, the kept query heads reading that KV head): the KV head is
/// freed with the last of them, so the shares add up to the group's whole score and cost.
fn candidates(
    cfg: &ModelConfig,
    l: usize,
    b: &BlockKept,
    s: &BlockScores,
    heads: bool,
) -> Vec<Cand> {
    let mut out: Vec<Cand> = s
        .channels
        .iter()
        .enumerate()
        .map(|(i, &x)| Cand {
            score: x,
            cost: channel_cost(cfg) as f64,
            density: 0.0,
            block: l,
            is_head: false,
            index: i,
        })
        .collect();
    if heads {
        let kv_local = |h: u32| b.kv_heads.iter().position(|&k| k == kv_of(cfg, h));
        let mut readers = vec![0usize; b.kv_heads.len()];
        for &h in &b.query_heads {
            if let Some(g) = kv_local(h) {
                readers[g] += 1;
            }
        }
        for (i, (&h, &x)) in b.query_heads.iter().zip(&s.heads).enumerate() {
            let (kv_score, kv_share) = match kv_local(h) {
                Some(g) => {
                    let r = readers[g].max(1) as f64;
                    (
                        s.kv_heads.get(g).copied().unwrap_or(0.0) / r,
                        kv_cost(cfg) as f64 / r,
                    )
                }
                None => (0.0, 0.0),
            };
            out.push(Cand {
                score: x + kv_score,
                cost: head_cost(cfg) as f64 + kv_share,
                density: 0.0,
                block: l,
                is_head: true,
                index: i,
            });
        }
    }
    out
}

/// Importance per parameter, lowest first (ties by block, kind, index: deterministic). The
/// order is total (no two candidates share block, kind and index), so the unstable sort gives
/// the one sorted order without the stable sort's scratch buffer.
fn sort_by_density(c: &mut [Cand]) {
    // Each key divided once, not twice per comparison (the divisions were most of the sort).
    for x in c.iter_mut() {
        x.density = x.score / x.cost;
    }
    c.sort_unstable_by(|a, b| {
        a.density
            .total_cmp(&b.density)
            .then(a.block.cmp(&b.block))
            .then(a.is_head.cmp(&b.is_head))
            .then(a.index.cmp(&b.index))
    });
}

/// Choose units to remove so that sparsity (over non-embedding parameters of the dense
/// `cfg`) reaches at least `target`, and return the new maps. Scores are per kept unit in
/// local order ([`BlockScores`]). Units go in order of importance per parameter removed
/// (a fractional knapsack, greedy by density), so a head is removed before a channel only
/// when its importance is below about 43 channels' worth. Globally, each block's scores are
/// first divided by that block's mean importance per parameter, so blocks compare on the same
/// scale; with `per_block`, each prunable block removes its share of the parameters
/// (LoRAPrune's per-layer ratio). The plan is overshot by less than one head and its KV head
/// per block pruned.
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
    if pc.uniform {
        let all: Vec<usize> = (0..kept.blocks.len()).collect();
        return select_uniform(cfg, kept, scores, want_removed, pc, &all);
    }
    let prunable: Vec<usize> = (0..kept.blocks.len())
        .filter(|l| !pc.protected_blocks.contains(l) && *l < scores.len())
        .collect();
    let per_block: Vec<Vec<Cand>> = prunable
        .iter()
        .map(|&l| candidates(cfg, l, &kept.blocks[l], &scores[l], pc.prune_heads))
        .collect();
    let mut drop_heads: Vec<Vec<usize>> = vec![Vec::new(); kept.blocks.len()];
    let mut drop_ch: Vec<Vec<usize>> = vec![Vec::new(); kept.blocks.len()];
    let mut removed = 0.0;
    if pc.per_block {
        let block_params = |l: usize| {
            let b = &kept.blocks[l];
            (b.query_heads.len() * head_cost(cfg)
                + b.kv_heads.len() * kv_cost(cfg)
                + b.mlp_channels.len() * channel_cost(cfg)) as f64
        };
        let total: f64 = prunable.iter().map(|&l| block_params(l)).sum();
        // Cumulative budgets: a block's shortfall or overshoot moves on to the next.
        let mut budget = 0.0;
        for (&l, cands) in prunable.iter().zip(per_block) {
            budget += want_removed * block_params(l) / total.max(1.0);
            let mut cands = cands;
            sort_by_density(&mut cands);
            greedy(
                cfg,
                kept,
                &cands,
                budget,
                pc,
                &mut removed,
                &mut drop_heads,
                &mut drop_ch,
            );
        }
    } else {
        let mut cands = Vec::new();
        for mut c in per_block {
            let (s, k): (f64, f64) = c
                .iter()
                .fold((0.0, 0.0), |(s, k), x| (s + x.score, k + x.cost));
            let mean = s / k.max(1.0);
            let norm = if mean > 0.0 && mean.is_finite() {
                mean
            } else {
                1.0
            };
            for x in &mut c {
                x.score /= norm;
            }
            cands.extend(c);
        }
        sort_by_density(&mut cands);
        greedy(
            cfg,
            kept,
            &cands,
            want_removed,
            pc,
            &mut removed,
            &mut drop_heads,
            &mut drop_ch,
        );
    }
    KeptIndices {
        blocks: kept
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| dropped(cfg, b, &drop_heads[l], &drop_ch[l]))
            .collect(),
    }
}

/// Take candidates in order until `removed` reaches `budget`, within the per-block minimums;
/// a head's removal also counts its KV head when no kept query head reads that any more.
#[allow(clippy::too_many_arguments)]
fn greedy(
    cfg: &ModelConfig,
    kept: &KeptIndices,
    cands: &[Cand],
    budget: f64,
    pc: &PruneConfig,
    removed: &mut f64,
    drop_heads: &mut [Vec<usize>],
    drop_ch: &mut [Vec<usize>],
) {
    for c in cands {
        if *removed >= budget {
            break;
        }
        let (l, i) = (c.block, c.index);
        let b = &kept.blocks[l];
        if c.is_head {
            if b.query_heads.len() - drop_heads[l].len() <= pc.min_heads_per_block {
                continue;
            }
            drop_heads[l].push(i);
            *removed += head_cost(cfg) as f64;
            let kv = kv_of(cfg, b.query_heads[i]);
            let still_read = b
                .query_heads
                .iter()
                .enumerate()
                .any(|(j, &h)| !drop_heads[l].contains(&j) && kv_of(cfg, h) == kv);
            if !still_read {
                *removed += kv_cost(cfg) as f64;
            }
        } else {
            if b.mlp_channels.len() - drop_ch[l].len() <= pc.min_channels_per_block {
                continue;
            }
            drop_ch[l].push(i);
            *removed += channel_cost(cfg) as f64;
        }
    }
}

/// `b` without its local query heads `heads` and channels `channels`; KV heads no kept query
/// head reads go too.
pub(super) fn dropped(
    cfg: &ModelConfig,
    b: &BlockKept,
    heads: &[usize],
    channels: &[usize],
) -> BlockKept {
    let query_heads: Vec<u32> = b
        .query_heads
        .iter()
        .enumerate()
        .filter(|(i, _)| !heads.contains(i))
        .map(|(_, &h)| h)
        .collect();
    let mut ch_drop = channels.to_vec();
    ch_drop.sort_unstable();
    let mlp_channels = b
        .mlp_channels
        .iter()
        .enumerate()
        .filter(|(i, _)| ch_drop.binary_search(i).is_err())
        .map(|(_, &c)| c)
        .collect();
    let mut kv_heads: Vec<u32> = query_heads.iter().map(|&h| kv_of(cfg, h)).collect();
    kv_heads.dedup();
    BlockKept {
        query_heads,
        kv_heads,
        mlp_channels,
    }
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
        let Some(s) = scores.get(l) else { continue };
        let lowest = |v: &[f64], k: usize| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        };
        // The lowest-scored heads of each KV group (the group's KV score is common to them).
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
        new.blocks[l] = dropped(cfg, &new.blocks[l], &dh, &dc);
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::to_rows;
    use crate::model::{BlockShape, Llama};
    use crate::prune::{magnitude_scores, random_scores, scores_rng, slice_model, KeptIndicesExt};
    use burn::tensor::Device;

    fn cfg() -> ModelConfig {
        let mut c = ModelConfig::dense(50, 32, 4, 4, 2, 8, 64, true);
        c.max_seq_len = 32;
        c
    }

    #[test]
    fn pruning_reaches_the_planned_count_within_one_group() {
        let c = cfg();
        let kept = KeptIndices::dense(&c);
        let mut rng = scores_rng(3);
        let m = Llama::random(c.clone(), 1, &Device::flex());
        let scores = random_scores(&m, &mut rng);
        for per_block in [false, true] {
            let pc = PruneConfig {
                min_channels_per_block: 1,
                per_block,
                ..PruneConfig::for_layers(4)
            };
            for target in [0.1, 0.25, 0.35] {
                let new = select_prune(&c, &kept, &scores, target, &pc);
                new.validate(&c).unwrap();
                let dense = c.dense_non_embedding_params() as f64;
                let planned = (1.0 - target) * dense;
                let got = params_of(&c, &new) as f64;
                // At or below the plan, by less than the largest group (a head plus its KV
                // head) per pruned block.
                let blocks = if per_block { 2.0 } else { 1.0 };
                assert!(got <= planned + 1e-9, "target {target}: {got} > {planned}");
                assert!(
                    planned - got < blocks * (head_cost(&c) + kv_cost(&c)) as f64,
                    "target {target} per_block {per_block}: overshoot {}",
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
    }

    /// Scores where every unit has the same importance per parameter except the named ones.
    fn flat(c: &ModelConfig) -> Vec<BlockScores> {
        let hc = (head_cost(c) + kv_cost(c) / 2) as f64; // 2 readers per KV head
        (0..c.n_layers())
            .map(|_| BlockScores {
                heads: vec![hc * 1.0 - 0.5 * kv_cost(c) as f64; 4],
                kv_heads: vec![kv_cost(c) as f64; 2],
                channels: vec![channel_cost(c) as f64; 64],
            })
            .collect()
    }

    #[test]
    fn heads_and_channels_are_ranked_by_importance_per_parameter() {
        let c = cfg();
        let kept = KeptIndices::dense(&c);
        let pc = PruneConfig {
            min_channels_per_block: 1,
            ..PruneConfig::for_layers(4)
        };
        // A budget of one head: head 3 of block 1 (whose KV head is unimportant) has twice a
        // channel's raw score but a quarter of its importance per parameter, so it goes first
        // and alone.
        let mut s = flat(&c);
        let group = (head_cost(&c) + kv_cost(&c) / 2) as f64;
        s[1].kv_heads[1] = 0.0;
        s[1].heads[3] = 2.0 * channel_cost(&c) as f64;
        assert!(s[1].heads[3] / group < 0.5);
        let target = (head_cost(&c) as f64 - 1.0) / c.dense_non_embedding_params() as f64;
        let new = select_prune(&c, &kept, &s, target, &pc);
        assert_eq!(new.blocks[1].query_heads, vec![0, 1, 2]);
        assert!(new.blocks.iter().all(|b| b.mlp_channels.len() == 64));
        // Heads at twice a channel's importance per parameter (their raw score over 10x a
        // channel's): the same budget is taken from channels.
        let mut s2 = flat(&c);
        for b in &mut s2 {
            b.heads = vec![2.0 * group - 0.5 * kv_cost(&c) as f64; 4];
        }
        assert!(s2[1].heads[0] > 10.0 * channel_cost(&c) as f64);
        let new2 = select_prune(&c, &kept, &s2, target, &pc);
        assert!(new2.blocks.iter().all(|b| b.query_heads.len() == 4));
        assert!(params_of(&c, &new2) < c.dense_non_embedding_params());
    }

    #[test]
    fn a_kv_head_counts_in_its_query_heads_scores() {
        let c = cfg(); // heads 0,1 read KV 0; heads 2,3 read KV 1
        let kept = KeptIndices::dense(&c);
        let pc = PruneConfig {
            min_channels_per_block: 60,
            ..PruneConfig::for_layers(4)
        };
        // Equal q/o scores everywhere; KV head 1 of block 2 unimportant: heads 2 and 3 of
        // block 2 go first, and with them KV head 1.
        let mut s = flat(&c);
        for b in &mut s {
            b.heads = vec![1.0; 4];
            b.kv_heads = vec![100.0; 2];
            b.channels = vec![1e6; 64];
        }
        s[2].kv_heads[1] = 0.0;
        let two_groups = (2 * head_cost(&c) + kv_cost(&c)) as f64;
        let target = (two_groups - 1.0) / c.dense_non_embedding_params() as f64;
        let new = select_prune(&c, &kept, &s, target, &pc);
        assert_eq!(new.blocks[2].query_heads, vec![0, 1]);
        assert_eq!(new.blocks[2].kv_heads, vec![0]);
        assert_eq!(new.blocks[1], kept.blocks[1]);
    }

    #[test]
    fn per_block_ratios_prune_every_prunable_block_alike() {
        let c = cfg();
        let kept = KeptIndices::dense(&c);
        let m = Llama::random(c.clone(), 4, &Device::flex());
        let mut s = magnitude_scores(&m);
        // Half of block 1's channels nearly unimportant: the global ranking takes them first,
        // per-block ratios still take the same share from every prunable block.
        for x in s[1].channels.iter_mut().take(32) {
            *x *= 1e-3;
        }
        let pc = PruneConfig {
            min_channels_per_block: 1,
            prune_heads: false,
            ..PruneConfig::for_layers(4)
        };
        let global = select_prune(&c, &kept, &s, 0.2, &pc);
        let per = select_prune(
            &c,
            &kept,
            &s,
            0.2,
            &PruneConfig {
                per_block: true,
                ..pc
            },
        );
        let ch = |k: &KeptIndices, l: usize| k.blocks[l].mlp_channels.len() as i64;
        // Globally, block 1 gives its 32 unimportant channels and keeps the rest (after the
        // per-block normalisation they weigh twice block 2's); per block, both give alike.
        let tiny_gone = (0..32u32).all(|j| !global.blocks[1].mlp_channels.contains(&j));
        assert!(tiny_gone && (ch(&global, 1) - ch(&global, 2)).abs() > 4);
        assert!(
            (ch(&per, 1) - ch(&per, 2)).abs() <= 1,
            "{} vs {}",
            ch(&per, 1),
            ch(&per, 2)
        );
    }

    #[test]
    fn kv_head_goes_when_no_query_head_reads_it() {
        let c = cfg(); // 4 heads on 2 KV heads: heads 0,1 -> kv 0; 2,3 -> kv 1
        let b = dropped(&c, &KeptIndices::dense(&c).blocks[1], &[0, 1], &[]);
        assert_eq!(b.query_heads, vec![2, 3]);
        assert_eq!(b.kv_heads, vec![1]);
        let b2 = dropped(&c, &KeptIndices::dense(&c).blocks[1], &[1, 3], &[]);
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
