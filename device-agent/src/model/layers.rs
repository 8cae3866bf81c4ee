//! The decoder's building blocks that carry no weights of their own: RMSNorm, rotary position
//! embeddings (rotate-half), causal attention, and softmax and SiLU on the fused CPU kernels of
//! [`crate::kernels`] (also under autodiff).

use burn::tensor::activation::silu;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use crate::kernels;

/// Precomputed rotary tables, `[max_seq_len, head_dim]` each (halves duplicated).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            let row: Vec<(f32, f32)> = (0..half)
                .map(|i| {
                    let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                    let a = pos as f64 * freq;
                    (a.cos() as f32, a.sin() as f32)
                })
                .collect();
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

pub(crate) fn rms_norm(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Tensor<2> {
    let ms = x.clone().square().mean_dim(1);
    let d = w.dims()[0];
    x * (ms + eps).sqrt().recip() * w.clone().reshape([1, d])
}

/// Causal scaled dot-product attention, `[batch, heads, seq, hd]` queries against `[batch,
/// heads, keys, hd]` keys and values, the queries being the last `seq` of the `keys` positions.
/// Leaner than burn's generic fallback on the CPU backend (`cargo bench -p device-agent --bench
/// speed -- profile`): the scale goes on `q` rather than on the `seq x keys` scores, the mask is
/// one add of a bias (0 or -1e30: finite, so [`softmax_fused`]'s identity stays exact), and the
/// softmax is the backend's fused kernel, also under autodiff.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, seq, hd] = q.dims();
    let keys = k.dims()[2];
    let q = q.mul_scalar(1.0 / (hd as f64).sqrt());
    let scores = q.matmul(k.swap_dims(2, 3));
    let scores = if seq > 1 {
        let past = keys - seq;
        let bias: Vec<f32> = (0..seq)
            .flat_map(|i| (0..keys).map(move |j| if j > past + i { -1e30 } else { 0.0 }))
            .collect();
        let bias = Tensor::<2>::from_data(TensorData::new(bias, [seq, keys]), &scores.device());
        scores + bias.reshape([1, 1, seq, keys])
    } else {
        scores
    };
    softmax_fused(scores).matmul(v)
}

/// Attention of one new position per sequence over its cached keys, with grouped KV heads
/// read in place: `q` is `[batch, n_heads, 1, hd]`, `k` and `v` are `[batch, n_kv_heads, t, hd]`,
/// and query head `h` reads KV head `h / (n_heads / n_kv_heads)` (consecutive, equal groups).
/// The group's queries become the rows of one `[g, hd] x [hd, t]` product per KV head, so the
/// keys and values are not copied out per query head as the general path does (at decoding
/// those copies were most of a step's memory traffic besides the weights). Every cached
/// position precedes the new one: no mask. Returns `[batch, n_heads, 1, hd]`.
pub fn grouped_decode_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [batch, nh, seq, hd] = q.dims();
    let nkv = k.dims()[1];
    debug_assert!(seq == 1 && nkv > 0 && nh % nkv == 0);
    let g = nh / nkv;
    let q = q
        .reshape([batch, nkv, g, hd])
        .mul_scalar(1.0 / (hd as f64).sqrt());
    let scores = q.matmul(k.swap_dims(2, 3));
    softmax_fused(scores)
        .matmul(v)
        .reshape([batch, nh, seq, hd])
}

/// Softmax over the last dimension with the backend's fused kernel for the value, also when
/// `s` is tracked by autodiff. Burn's autodiff builds softmax from max, sub, exp, sum and div,
/// and the CPU backend's element-wise `exp` is scalar and single-threaded (about 20x the cost
/// of an add per element), which made attention's softmax the largest non-matmul cost of a
/// training step. Here the value `P` comes from the fused kernel as a constant and the
/// gradient from an expression that is zero in value:
/// `y = P + P*z - P*sum(P*z)` with `z = s - detach(s)`, whose vector-Jacobian product is
/// exactly softmax's, `ds = P * (dy - sum(dy * P))`. Needs finite `s` (`z` must be 0, not NaN).
pub fn softmax_fused<const D: usize>(s: Tensor<D>) -> Tensor<D> {
    let plain = |t: Tensor<D>| kernels::softmax_last(&t).unwrap_or_else(|| softmax(t, D - 1));
    if !s.is_tracked() {
        return plain(s.inner());
    }
    let p = plain(s.clone().inner());
    let z = s.clone() - s.detach();
    let pz = z * p.clone();
    let corr = pz.clone().sum_dim(D - 1) * p.clone();
    pz - corr + p
}

/// SiLU with the value and slope from one vectorised pass ([`kernels::silu_with_slope`]) and
/// the gradient through `y = v + (g - detach(g)) * slope`, zero in its second term: three cheap
/// element-wise operations under autodiff instead of flex's scalar sigmoid and its backward.
/// Other backends use burn's `silu`.
pub fn silu_fused<const D: usize>(g: Tensor<D>) -> Tensor<D> {
    if !g.is_tracked() {
        let g = g.inner();
        return kernels::silu_value(&g).unwrap_or_else(|| silu(g));
    }
    match kernels::silu_with_slope(&g.clone().inner()) {
        Some((v, slope)) => v + (g.clone() - g.detach()) * slope,
        None => silu(g),
    }
}
