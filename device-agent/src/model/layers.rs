//! The decoder's building blocks that carry no weights of their own: RMSNorm, rotary position
//! embeddings (rotate-half) and causal attention (its softmax is [`crate::fused::softmax`]).

use burn::tensor::{Device, Tensor, TensorData};

use crate::fused;

/// Precomputed rotary tables, `[max_seq_len, head_dim]` each (halves duplicated).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &Device) -> Self {
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            let row: Vec<(f32, f32)> = rope_angles(head_dim, pos, theta).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|r| r.0));
                sin.extend(row.iter().map(|r| r.1));
            }
        }
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, [max_seq_len, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_seq_len, head_dim]), device),
        }
    }

    /// Rotate the rows `x` `[batch * seq, heads * head_dim]` (a q or k product's output, its
    /// heads not yet split) for positions `start..start + seq` of each sequence: one pass on
    /// flex ([`crate::fused::rope`]), [`Rope::apply`] on the split heads elsewhere.
    pub fn apply_rows(&self, x: Tensor<2>, start: usize, seq: usize) -> Tensor<2> {
        let hd = self.cos.dims()[1];
        let [rows, width] = x.dims();
        crate::fused::rope(x.clone(), &self.cos, &self.sin, hd, seq, start).unwrap_or_else(|| {
            let (batch, heads) = (rows / seq, width / hd);
            let split = x.reshape([batch, seq, heads, hd]).swap_dims(1, 2);
            self.apply(split, start)
                .swap_dims(1, 2)
                .reshape([rows, width])
        })
    }

    /// Rotate `x` of shape `[batch, heads, seq, head_dim]` for positions `start..start+seq`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [_, _, seq, hd] = x.dims();
        let cos = self
            .cos
            .clone()
            .narrow(0, start, seq)
            .reshape([1, 1, seq, hd]);
        let sin = self
            .sin
            .clone()
            .narrow(0, start, seq)
            .reshape([1, 1, seq, hd]);
        let x1 = x.clone().narrow(3, 0, hd / 2);
        let x2 = x.clone().narrow(3, hd / 2, hd / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

/// The rotary `(cos, sin)` of position `pos` for each of a head's `head_dim / 2` frequency
/// pairs (`theta^(-2i / head_dim)`), computed in f64 and rounded once.
pub(crate) fn rope_angles(
    head_dim: usize,
    pos: usize,
    theta: f64,
) -> impl Iterator<Item = (f32, f32)> {
    (0..head_dim / 2).map(move |i| {
        let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
        let a = pos as f64 * freq;
        (a.cos() as f32, a.sin() as f32)
    })
}

/// RMSNorm of the rows of `x`: one pass on flex ([`crate::fused::rms_norm`]), burn's
/// operations elsewhere.
pub(crate) fn rms_norm(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Tensor<2> {
    if let Some(y) = crate::fused::rms_norm(x.clone(), w, eps) {
        return y;
    }
    let ms = x.clone().square().mean_dim(1);
    let d = w.dims()[0];
    x * (ms + eps).sqrt().recip() * w.clone().reshape([1, d])
}

/// Causal scaled dot-product attention with grouped KV heads read in place: `q` is `[batch,
/// n_heads, seq, hd]`, `k` and `v` are `[batch, n_kv_heads, keys, hd]` with `n_heads` a multiple
/// of `n_kv_heads`, query head `h` reads KV head `h / (n_heads / n_kv_heads)` (equal consecutive
/// groups; other maps expand `k` and `v` to one head per query head first), and the queries are
/// the last `seq` of the `keys` positions. Returns `[batch, n_heads, seq, hd]`.
///
/// A group's queries become the rows of one `[g * seq, hd] x [hd, keys]` product per KV head, so
/// keys and values are neither copied out per query head nor kept so for the backward pass
/// (at decoding those copies were most of a step's memory traffic besides the weights). On flex
/// this is [`fused::causal_attention`] (scale and mask inside its softmax; under autodiff it keeps
/// `q`, `k` and `v` and recomputes the probabilities); elsewhere [`attention_by_ops`].
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [batch, nh, seq, hd] = q.dims();
    let nkv = k.dims()[1];
    debug_assert!(nkv > 0 && nh % nkv == 0);
    let q = q.reshape([batch, nkv, nh / nkv * seq, hd]);
    fused::causal_attention(q.clone(), k.clone(), v.clone(), seq)
        .unwrap_or_else(|| attention_by_ops(q, k, v, seq))
        .reshape([batch, nh, seq, hd])
}

/// [`causal_attention`] in burn's operations, for backends without [`fused::causal_attention`]
/// (and as its reference in tests): `q` is `[batch, kv_heads, g * seq, hd]`, `k` and `v`
/// `[batch, kv_heads, keys, hd]`. Leaner than burn's generic attention: the scale goes on `q`
/// rather than on the scores and the mask is one add of a bias (0 or -1e30, which the softmax
/// weighs 0).
pub(crate) fn attention_by_ops(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, seq: usize) -> Tensor<4> {
    let [_, _, rows, hd] = q.dims();
    let keys = k.dims()[2];
    let q = q.mul_scalar(1.0 / (hd as f64).sqrt());
    let scores = q.matmul(k.swap_dims(2, 3));
    let scores = if seq > 1 {
        // Row `r` of a group is the query at position `past + r % seq`.
        let past = keys - seq;
        let bias: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let i = past + r % seq;
                (0..keys).map(move |j| if j > i { -1e30 } else { 0.0 })
            })
            .collect();
        let bias = Tensor::<2>::from_data(TensorData::new(bias, [rows, keys]), &scores.device());
        scores + bias.reshape([1, 1, rows, keys])
    } else {
        scores
    };
    fused::softmax(scores).matmul(v)
}
