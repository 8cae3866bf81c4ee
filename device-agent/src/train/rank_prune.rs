//! HetLoRA's rank self-pruning on the device (Cho et al., 2024, "Heterogeneous LoRA for
//! Federated Fine-tuning of On-Device Foundation Models"), with the settings a `hetlora` round
//! sends ([`RankPruning`]).
//!
//! During local training the objective gains `reg * (|A_tail|_F + |B_tail|_F)` for every
//! adapted projection, where the tail is the last `tail_len(rank)` rank components: its
//! gradient, `reg * X_tail / |X_tail|_F` on each factor's tail and zero elsewhere, is added to
//! the accumulated LoRA gradients before each optimiser step ([`add_tail_gradients`]), pushing
//! the tail toward zero. After the round the device measures the tail's share of the adapter's
//! delta, `sqrt(sum_l |a_t b_t|_F^2 / sum_l |a b|_F^2)` over all layers (the scale cancels),
//! and drops the tail when the share is below `gamma` ([`Tuner::self_prune_rank`]); the
//! update then reports the lower rank, and the kept components' delta is unchanged (the
//! resize rescales `B` for the new `alpha / rank`). The paper penalises the tail's norm and
//! cuts the rank by a decay factor; the penalty on each factor's Frobenius norm and the
//! norm-share threshold are this reading of it.

use burn::tensor::Tensor;
use protocol::RankPruning;

use super::Tuner;
use crate::lora::Adapter;

/// Adds the tail regulariser's gradient to `grads` (one per factor, in the order
/// `blocks -> projections -> (a, b)`, burn orientation: `a` is `[in, rank]`, `b` is
/// `[rank, out]`). A factor whose tail is all zero gets no push (the norm's gradient is
/// taken as zero there). Does nothing without a tail (rank 1) or with `reg = 0`.
pub(super) fn add_tail_gradients(
    adapter: &Adapter,
    grads: &mut [Option<Tensor<2>>],
    rank_pruning: &RankPruning,
) {
    let rank = adapter.rank;
    let tail = rank_pruning.tail_len(rank as u32) as usize;
    if tail == 0 || rank_pruning.reg <= 0.0 {
        return;
    }
    let head = rank - tail;
    let tails: Vec<(Tensor<2>, usize)> = adapter
        .blocks
        .iter()
        .flat_map(|blk| blk.iter())
        .flat_map(|f| {
            [
                (f.a.clone().narrow(1, head, tail), 1),
                (f.b.clone().narrow(0, head, tail), 0),
            ]
        })
        .collect();
    // Every tail's squared norm in one read.
    let sq: Vec<Tensor<1>> = tails
        .iter()
        .map(|(t, _)| t.clone().square().sum().reshape([1]))
        .collect();
    let norms: Vec<f32> = match Tensor::cat(sq, 0).into_data().try_into_vec::<f32>() {
        Ok(v) => v,
        Err(_) => return,
    };
    let reg = rank_pruning.reg as f64;
    for ((slot, (t, dim)), sq) in grads.iter_mut().zip(tails).zip(norms) {
        let norm = (sq as f64).sqrt();
        if norm <= 0.0 || !norm.is_finite() {
            continue;
        }
        let g_tail = t.mul_scalar(reg / norm);
        let dims = g_tail.dims();
        let mut head_dims = dims;
        head_dims[dim] = head;
        let zeros = Tensor::<2>::zeros(head_dims, &g_tail.device());
        let g = Tensor::cat(vec![zeros, g_tail], dim);
        *slot = Some(match slot.take() {
            Some(acc) => acc + g,
            None => g,
        });
    }
}

/// The tail's share of the adapter's delta norm, `sqrt(sum_l |a_t b_t|^2 / sum_l |a b|^2)`
/// over every adapted projection, for a tail of `tail` components; `None` when the adapter's
/// delta is zero or not finite (nothing to compare against). Each squared norm is
/// `sum((a^T a) * (b b^T))` on the `rank x rank` Gram matrices, never the full delta.
pub fn tail_share(adapter: &Adapter, tail: usize) -> Option<f64> {
    let rank = adapter.rank;
    if tail == 0 || tail >= rank {
        return None;
    }
    let head = rank - tail;
    let gram_norm = |a: Tensor<2>, b: Tensor<2>| -> Tensor<1> {
        let ga = a.clone().transpose().matmul(a);
        let gb = b.clone().matmul(b.transpose());
        (ga * gb).sum().reshape([1])
    };
    let mut parts = Vec::new();
    for f in adapter.blocks.iter().flat_map(|b| b.iter()) {
        parts.push(gram_norm(f.a.clone(), f.b.clone()));
        parts.push(gram_norm(
            f.a.clone().narrow(1, head, tail),
            f.b.clone().narrow(0, head, tail),
        ));
    }
    if parts.is_empty() {
        return None;
    }
    let v: Vec<f32> = Tensor::cat(parts, 0)
        .into_data()
        .try_into_vec::<f32>()
        .ok()?;
    let (mut whole, mut part) = (0.0f64, 0.0f64);
    for pair in v.chunks_exact(2) {
        whole += pair[0] as f64;
        part += pair[1] as f64;
    }
    if !(whole.is_finite() && part.is_finite()) || whole <= 0.0 {
        return None;
    }
    Some((part.max(0.0) / whole).sqrt())
}

/// What the self-pruning step decided after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfPruned {
    /// The rank the round trained at.
    pub trained_rank: usize,
    /// The rank the update reports (lower when the tail was dropped).
    pub rank: usize,
    /// The tail's share of the delta norm (`None`: the delta was zero).
    pub tail_share: Option<f64>,
}

impl Tuner {
    /// HetLoRA's regulariser from now on (`None`: off, the default).
    pub fn with_rank_pruning(mut self, rank_pruning: Option<RankPruning>) -> Self {
        self.rank_pruning = rank_pruning;
        self
    }

    /// After a round: drops the adapter's tail components when their share of the delta norm
    /// is below `gamma` (the kept components' delta is unchanged). Without rank pruning, or at
    /// rank 1, the adapter is left as it is.
    pub fn self_prune_rank(&mut self) -> SelfPruned {
        let rank = self.adapter.rank;
        let mut out = SelfPruned {
            trained_rank: rank,
            rank,
            tail_share: None,
        };
        let Some(rp) = self.rank_pruning else {
            return out;
        };
        let tail = rp.tail_len(rank as u32) as usize;
        out.tail_share = tail_share(&self.adapter, tail);
        if let Some(share) = out.tail_share {
            if share < rp.gamma as f64 {
                // Truncation draws no random numbers; the seed only names the resize.
                self.adapter = self.adapter.resize(rank - tail, self.cfg.seed);
                out.rank = rank - tail;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraFactors;
    use crate::model::{Llama, ModelConfig};
    use crate::prune::KeptIndicesExt;
    use burn::tensor::{Device, TensorData};
    use protocol::KeptIndices;

    /// A `[rows, cols]` factor of `values`.
    fn factor(values: Vec<f32>, rows: usize, cols: usize) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values, [rows, cols]), &Device::flex())
    }

    const PRUNING: RankPruning = RankPruning {
        reg: 0.5,
        gamma: 0.1,
        step: 0.25,
    };

    /// One projection's factors at rank 4: `a` is `[3, 4]`, `b` is `[4, 2]`; component `i`
    /// has size `sizes[i]`.
    fn adapter_with(sizes: [f32; 4]) -> Adapter {
        let a: Vec<f32> = (0..3)
            .flat_map(|row| sizes.iter().map(move |s| s * (1.0 + row as f32)))
            .collect();
        let b: Vec<f32> = sizes.iter().flat_map(|s| [*s, -0.5 * s]).collect();
        Adapter {
            rank: 4,
            alpha: 8.0,
            blocks: vec![vec![LoraFactors {
                a: factor(a, 3, 4),
                b: factor(b, 4, 2),
            }]],
        }
    }

    fn values(t: &Tensor<2>) -> Vec<f32> {
        t.clone().into_data().try_to_vec::<f32>().unwrap()
    }

    /// hetlora's rank self-pruning: the regulariser's gradient points along the tail (so a
    /// descent step shrinks it), is `reg` long on each factor, and leaves the head alone.
    #[test]
    fn hetloras_rank_self_pruning_regulariser_gradient_shrinks_only_the_tail() {
        let ad = adapter_with([1.0, 0.8, 0.6, 0.4]);
        let mut grads = vec![None, None];
        add_tail_gradients(&ad, &mut grads, &PRUNING);
        let ga = values(grads[0].as_ref().unwrap());
        let gb = values(grads[1].as_ref().unwrap());
        let a = values(&ad.blocks[0][0].a);
        let b = values(&ad.blocks[0][0].b);
        // Tail of rank 4 at step 0.25: the last component only (column 3 of a, row 3 of b).
        for (i, (&g, &x)) in ga.iter().zip(&a).enumerate() {
            if i % 4 == 3 {
                assert!(g * x > 0.0, "a[{i}]: gradient {g} does not point along {x}");
            } else {
                assert_eq!(g, 0.0, "a[{i}] is in the head");
            }
        }
        for (i, (&g, &x)) in gb.iter().zip(&b).enumerate() {
            if i / 2 == 3 {
                assert!(g * x > 0.0, "b[{i}]: gradient {g} does not point along {x}");
            } else {
                assert_eq!(g, 0.0, "b[{i}] is in the head");
            }
        }
        let norm = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
        assert!((norm(&ga) - 0.5).abs() < 1e-6 && (norm(&gb) - 0.5).abs() < 1e-6);
        // A plain gradient step on the regulariser alone shrinks the tail and nothing else.
        let step = |x: &[f32], g: &[f32]| -> Vec<f32> {
            x.iter().zip(g).map(|(x, g)| x - 0.1 * g).collect()
        };
        let (a2, b2) = (step(&a, &ga), step(&b, &gb));
        let tail_norm = |v: &[f32], tail: &dyn Fn(usize) -> bool| {
            norm(
                &v.iter()
                    .enumerate()
                    .filter(|(i, _)| tail(*i))
                    .map(|(_, x)| *x)
                    .collect::<Vec<_>>(),
            )
        };
        let in_a = |i: usize| i % 4 == 3;
        let in_b = |i: usize| i / 2 == 3;
        assert!(tail_norm(&a2, &in_a) < tail_norm(&a, &in_a));
        assert!(tail_norm(&b2, &in_b) < tail_norm(&b, &in_b));
        assert_eq!(tail_norm(&a2, &|i| !in_a(i)), tail_norm(&a, &|i| !in_a(i)));
        // Existing gradients are added to, not replaced.
        let mut grads = vec![Some(ad.blocks[0][0].a.ones_like()), None];
        add_tail_gradients(&ad, &mut grads, &PRUNING);
        let ga2 = values(grads[0].as_ref().unwrap());
        for (g2, g) in ga2.iter().zip(&ga) {
            assert!((g2 - (1.0 + g)).abs() < 1e-6);
        }
        // Off at reg 0.
        let mut grads = vec![None, None];
        add_tail_gradients(
            &ad,
            &mut grads,
            &RankPruning {
                reg: 0.0,
                ..PRUNING
            },
        );
        assert!(grads.iter().all(Option::is_none));
    }

    /// hetlora's rank self-pruning: a tail with a small share of the delta is dropped, the
    /// kept components' delta is unchanged; a tail that carries the update stays.
    #[test]
    fn hetloras_rank_self_pruning_drops_a_small_tail_and_keeps_a_large_one() {
        let mut cfg = ModelConfig::dense(20, 8, 1, 2, 1, 4, 8, true);
        cfg.max_seq_len = 16;
        let base = Llama::random(cfg.clone(), 3, &Device::flex());
        let kept = KeptIndices::dense(&cfg);
        let dense = Adapter::new(&cfg, 4, 8.0, 5, &base.device);
        // Give every projection a delta whose last component is tiny (share about 1%) ...
        let small_tail = |ad: &Adapter, last: f32| Adapter {
            blocks: ad
                .blocks
                .iter()
                .map(|blk| {
                    blk.iter()
                        .map(|f| {
                            let [din, r] = f.a.dims();
                            let [_, dout] = f.b.dims();
                            let a: Vec<f32> = (0..din * r)
                                .map(|i| if i % r == r - 1 { last } else { 1.0 })
                                .collect();
                            let b: Vec<f32> = (0..r * dout)
                                .map(|i| if i / dout == r - 1 { last } else { 0.5 })
                                .collect();
                            LoraFactors {
                                a: factor(a, din, r),
                                b: factor(b, r, dout),
                            }
                        })
                        .collect()
                })
                .collect(),
            ..ad.clone()
        };
        let tuner = |ad: Adapter| {
            Tuner::new(
                &base,
                kept.clone(),
                ad,
                crate::train::TrainConfig::default(),
            )
            .unwrap()
            .with_rank_pruning(Some(PRUNING))
        };
        let mut t = tuner(small_tail(&dense, 0.1));
        let before: Vec<f32> = {
            let f = &t.adapter.blocks[0][0];
            let head = |x: Tensor<2>, dim| x.narrow(dim, 0, 3);
            values(
                &head(f.a.clone(), 1)
                    .matmul(head(f.b.clone(), 0))
                    .mul_scalar(t.adapter.scale()),
            )
        };
        let out = t.self_prune_rank();
        assert_eq!((out.trained_rank, out.rank), (4, 3), "{out:?}");
        assert!(out.tail_share.unwrap() < 0.1, "{out:?}");
        assert_eq!(t.adapter.rank, 3);
        let f = &t.adapter.blocks[0][0];
        assert_eq!(f.a.dims()[1], 3);
        let after = values(
            &f.a.clone()
                .matmul(f.b.clone())
                .mul_scalar(t.adapter.scale()),
        );
        for (x, y) in before.iter().zip(&after) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
        }
        // A tail as large as the rest is a quarter of the delta: kept.
        let mut t = tuner(small_tail(&dense, 1.0));
        let out = t.self_prune_rank();
        assert_eq!(out.rank, 4, "{out:?}");
        assert!(out.tail_share.unwrap() > 0.1);
        // A fresh adapter (B = 0) has no delta to compare against: kept.
        let mut t = tuner(dense.clone());
        assert_eq!(t.self_prune_rank().rank, 4);
        // Without rank pruning nothing is measured or dropped.
        let mut t = tuner(small_tail(&dense, 0.1)).with_rank_pruning(None);
        assert_eq!(
            t.self_prune_rank(),
            SelfPruned {
                trained_rank: 4,
                rank: 4,
                tail_share: None
            }
        );
    }
}
