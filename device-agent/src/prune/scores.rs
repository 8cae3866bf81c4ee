//! Importance of structured units: the criteria (LoRA-gradient, Taylor, magnitude, random),
//! per-element importance summed into group scores per query head, KV head and MLP channel
//! ([`group_scores`]), and the device's importance EMA ([`Importance`]), which persists
//! across rounds with the kept maps, is sliced when they shrink and is bias-corrected while
//! young.

use burn::tensor::Tensor;
use protocol::{KeptIndices, Proj};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{local_positions, PruneError};
use crate::kernels::Along;
use crate::model::Llama;

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

impl Criterion {
    /// Whether the criterion learns from training steps (an EMA of per-step scores); the
    /// others are computed afresh at each pruning event.
    pub fn tracks_steps(self) -> bool {
        matches!(self, Criterion::LoraGradient | Criterion::Taylor)
    }
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

/// Group scores of one block, per kept unit in local order: query heads (their q columns and
/// o rows), KV heads (their k and v columns) and MLP channels (gate and up columns, down row).
/// A KV head's score is kept apart from its query heads' because it is shared: the ranking
/// ([`super::select_prune`]) splits it evenly among the kept query heads that read it, and a
/// KV head goes only with the last of them. An empty `kv_heads` counts as zeros.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BlockScores {
    pub heads: Vec<f64>,
    #[serde(default)]
    pub kv_heads: Vec<f64>,
    pub channels: Vec<f64>,
}

/// Sum per-element importance matrices (`[in, out]`, one per projection, from `imp`) of a
/// block into group scores; `head_dim` elements make a head.
pub fn group_scores(imp: impl Fn(Proj) -> Tensor<2>, head_dim: usize) -> BlockScores {
    group_sums(|p, along| sum_along(imp(p), along), head_dim)
}

/// An `[in, out]` element-score matrix summed `along` one axis.
pub fn sum_along(t: Tensor<2>, along: Along) -> Tensor<1> {
    let dim = match along {
        Along::Inputs => 0,
        Along::Outputs => 1,
    };
    let n = t.dims()[1 - dim];
    t.sum_dim(dim).reshape([n])
}

/// Group scores from each projection's element scores already summed (`sum(p, along)`: over
/// the input rows for `q`, `k`, `v`, `gate`, `up`, one value per output; over the output
/// columns for `o` and `down`, one per input); `head_dim` values make a head.
pub fn group_sums(sum: impl Fn(Proj, Along) -> Tensor<1>, head_dim: usize) -> BlockScores {
    let hd = head_dim.max(1);
    let summed = |p: Proj, along| {
        let t = sum(p, along);
        (t.dims()[0] > 0).then_some(t)
    };
    let per_out = |p: Proj| summed(p, Along::Inputs);
    let per_in = |p: Proj| summed(p, Along::Outputs);
    let by_head = |t: Tensor<1>| {
        let n = t.dims()[0] / hd;
        t.reshape([n, hd]).sum_dim(1).reshape([n])
    };
    let heads = match (per_out(Proj::Q), per_in(Proj::O)) {
        (Some(q), Some(o)) => host_f64(by_head(q + o)),
        _ => Vec::new(),
    };
    let kv_heads = match (per_out(Proj::K), per_out(Proj::V)) {
        (Some(k), Some(v)) => host_f64(by_head(k + v)),
        _ => Vec::new(),
    };
    let channels = match (per_out(Proj::Gate), per_out(Proj::Up), per_in(Proj::Down)) {
        (Some(g), Some(u), Some(d)) => host_f64(g + u + d),
        _ => Vec::new(),
    };
    BlockScores {
        heads,
        kv_heads,
        channels,
    }
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
    (0..m.blocks.len())
        .map(|l| group_scores(|p| m.base_weight(l, p).abs(), m.config.head_dim))
        .collect()
}

/// Seeded random scores with the model's current shapes.
pub fn random_scores(m: &Llama, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<BlockScores> {
    m.config
        .blocks
        .iter()
        .map(|s| BlockScores {
            heads: (0..s.n_heads).map(|_| rng.random::<f64>()).collect(),
            kv_heads: (0..s.n_kv_heads).map(|_| rng.random::<f64>()).collect(),
            channels: (0..s.ffn_dim).map(|_| rng.random::<f64>()).collect(),
        })
        .collect()
}

/// A fresh RNG for random scores.
pub fn scores_rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x005e_ed0f_5c0e)
}

/// Slice per-unit score vectors from `old` to `new` kept maps (`new` a subset of `old`).
pub fn slice_scores(
    scores: &[BlockScores],
    old: &KeptIndices,
    new: &KeptIndices,
) -> Vec<BlockScores> {
    let pick = |v: &[f64], o: &[u32], n: &[u32]| -> Vec<f64> {
        if v.is_empty() {
            return Vec::new();
        }
        local_positions(o, n).iter().map(|&i| v[i]).collect()
    };
    scores
        .iter()
        .zip(old.blocks.iter().zip(&new.blocks))
        .map(|(s, (o, n))| BlockScores {
            heads: pick(&s.heads, &o.query_heads, &n.query_heads),
            kv_heads: pick(&s.kv_heads, &o.kv_heads, &n.kv_heads),
            channels: pick(&s.channels, &o.mlp_channels, &n.mlp_channels),
        })
        .collect()
}

/// A device's importance EMA over its kept units, carried from round to round with its kept
/// maps (a field of the session's `DeviceState`).
///
/// `ema` starts at zero and takes `ema = beta * ema + (1 - beta) * x` per sample; the
/// estimate is the bias-corrected `ema / (1 - beta^samples)`, so the first sample is not
/// over-weighted (after three samples they weigh `beta^2, beta, 1` over their sum, not
/// `0.81, 0.09, 0.1`). Feeding `n` samples in one run or split over rounds gives the same
/// state, provided the hand-over passes it unchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Importance {
    /// The zero-initialised EMA, per block (empty until the first sample).
    pub ema: Vec<BlockScores>,
    /// Samples folded in since the EMA began.
    pub samples: u64,
}

impl Importance {
    pub fn is_empty(&self) -> bool {
        self.samples == 0 || self.ema.is_empty()
    }

    /// Fold one sample of per-block scores in with factor `beta`. A sample whose shape does
    /// not match the EMA's (it cannot happen when the EMA is sliced with the kept maps)
    /// restarts the EMA from it.
    pub fn update(&mut self, now: Vec<BlockScores>, beta: f64) {
        let same_shape = self.ema.len() == now.len()
            && self.ema.iter().zip(&now).all(|(a, b)| {
                a.heads.len() == b.heads.len()
                    && a.kv_heads.len() == b.kv_heads.len()
                    && a.channels.len() == b.channels.len()
            });
        if self.is_empty() || !same_shape {
            self.samples = 0;
            self.ema = now
                .iter()
                .map(|b| BlockScores {
                    heads: vec![0.0; b.heads.len()],
                    kv_heads: vec![0.0; b.kv_heads.len()],
                    channels: vec![0.0; b.channels.len()],
                })
                .collect();
        }
        let mix = |e: &mut Vec<f64>, x: &[f64]| {
            for (a, b) in e.iter_mut().zip(x) {
                *a = beta * *a + (1.0 - beta) * b;
            }
        };
        for (e, x) in self.ema.iter_mut().zip(&now) {
            mix(&mut e.heads, &x.heads);
            mix(&mut e.kv_heads, &x.kv_heads);
            mix(&mut e.channels, &x.channels);
        }
        self.samples += 1;
    }

    /// The bias-corrected estimate, or `None` before the first sample.
    pub fn estimate(&self, beta: f64) -> Option<Vec<BlockScores>> {
        if self.is_empty() {
            return None;
        }
        let n = i32::try_from(self.samples).unwrap_or(i32::MAX);
        let c = 1.0 - beta.powi(n);
        let c = if c > 0.0 { c } else { 1.0 };
        let fix = |v: &[f64]| v.iter().map(|x| x / c).collect();
        Some(
            self.ema
                .iter()
                .map(|b| BlockScores {
                    heads: fix(&b.heads),
                    kv_heads: fix(&b.kv_heads),
                    channels: fix(&b.channels),
                })
                .collect(),
        )
    }

    /// The EMA sliced from `old` to `new` kept maps (`new` a subset of `old`).
    pub fn slice(&self, old: &KeptIndices, new: &KeptIndices) -> Importance {
        if self.is_empty() {
            return Importance::default();
        }
        Importance {
            ema: slice_scores(&self.ema, old, new),
            samples: self.samples,
        }
    }

    /// Check a carried EMA (from a state file, say) against the kept maps it belongs to:
    /// one entry per block, one score per kept unit, every score finite and non-negative.
    pub fn check(&self, kept: &KeptIndices) -> Result<(), PruneError> {
        if self.is_empty() {
            return Ok(());
        }
        if self.ema.len() != kept.blocks.len() {
            return Err(PruneError::BlockCount {
                got: self.ema.len(),
                want: kept.blocks.len(),
            });
        }
        for (block, (s, k)) in self.ema.iter().zip(&kept.blocks).enumerate() {
            for (what, v, want) in [
                ("head", &s.heads, k.query_heads.len()),
                ("kv head", &s.kv_heads, k.kv_heads.len()),
                ("channel", &s.channels, k.mlp_channels.len()),
            ] {
                if v.len() != want && !(what == "kv head" && v.is_empty()) {
                    return Err(PruneError::ImportanceShape {
                        block,
                        what,
                        got: v.len(),
                        want,
                    });
                }
                if let Some(&x) = v.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                    return Err(PruneError::ImportanceValue {
                        block,
                        what,
                        value: x,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::prune::KeptIndicesExt;
    use burn::tensor::{Device, TensorData};

    fn scores(x: f64, heads: usize, kv: usize, ch: usize) -> Vec<BlockScores> {
        vec![BlockScores {
            heads: vec![x; heads],
            kv_heads: vec![x; kv],
            channels: vec![x; ch],
        }]
    }

    #[test]
    fn ema_is_bias_corrected_and_splits_over_rounds() {
        let beta = 0.9;
        let mut one = Importance::default();
        one.update(scores(1.0, 2, 1, 3), beta);
        // One sample: the estimate is the sample itself.
        assert!((one.estimate(beta).unwrap()[0].heads[0] - 1.0).abs() < 1e-12);
        one.update(scores(3.0, 2, 1, 3), beta);
        // Two samples weigh beta : 1.
        let want = (beta * 1.0 + 3.0) / (1.0 + beta);
        assert!((one.estimate(beta).unwrap()[0].channels[2] - want).abs() < 1e-12);
        // Split over two "rounds" through a serialised hand-over: the same state.
        let mut a = Importance::default();
        a.update(scores(1.0, 2, 1, 3), beta);
        let carried: Importance =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let mut b = carried;
        b.update(scores(3.0, 2, 1, 3), beta);
        assert_eq!(a.samples + 1, b.samples);
        assert_eq!(b, one);
    }

    #[test]
    fn ema_check_names_the_bad_block() {
        let c = ModelConfig::dense(50, 32, 2, 4, 2, 8, 16, true);
        let kept = KeptIndices::dense(&c);
        let mut imp = Importance::default();
        imp.update(
            vec![
                BlockScores {
                    heads: vec![1.0; 4],
                    kv_heads: vec![1.0; 2],
                    channels: vec![1.0; 16],
                };
                2
            ],
            0.9,
        );
        imp.check(&kept).unwrap();
        let mut short = imp.clone();
        short.ema[1].channels.pop();
        let e = short.check(&kept).unwrap_err().to_string();
        assert!(e.contains("block 1") && e.contains("channel"), "{e}");
        let mut nan = imp.clone();
        nan.ema[0].heads[2] = f64::NAN;
        assert!(nan
            .check(&kept)
            .unwrap_err()
            .to_string()
            .contains("block 0"));
    }

    #[test]
    fn group_scores_count_k_and_v_per_kv_head() {
        let d = Device::flex();
        let hd = 2;
        // 2 query heads on 1 KV head, 3 channels, d_model 2.
        let ones = |r: usize, c: usize| {
            Tensor::<2>::from_data(TensorData::new(vec![1.0f32; r * c], [r, c]), &d)
        };
        let s = group_scores(
            |p| match p {
                Proj::Q => ones(2, 4),
                Proj::K | Proj::V => ones(2, 2).mul_scalar(2.0),
                Proj::O => ones(4, 2),
                Proj::Gate | Proj::Up => ones(2, 3),
                Proj::Down => ones(3, 2),
            },
            hd,
        );
        assert_eq!(s.heads, vec![8.0, 8.0]);
        assert_eq!(s.kv_heads, vec![16.0]);
        assert_eq!(s.channels, vec![6.0, 6.0, 6.0]);
    }
}
