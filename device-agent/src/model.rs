//! The LLaMA-architecture decoder on burn: RMSNorm, rotary position embeddings, grouped-query
//! attention with an explicit query-head -> KV-head map, SwiGLU MLP, tied or untied LM head,
//! optional LoRA adapters on all seven projections, and a KV cache for generation.
//!
//! Per-block head and channel counts may differ (structured pruning makes them differ), so the
//! shape of every block lives in [`BlockShape`] rather than in global constants.
//!
//! Orientation: weights are stored as burn computes them, `[in, out]`, so `y = x @ W`.
//! Rotary embeddings use the rotate-half convention (first half / second half of each head);
//! GGUF files store q/k rows permuted for interleaved pairs and are un-permuted on import
//! (see [`crate::weights`]).

use burn::tensor::activation::silu;
use burn::tensor::activation::softmax;
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::kernels;
use crate::lora::Adapter;

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
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return false;
        }
        let g = self.n_heads / self.n_kv_heads;
        self.q_to_kv.iter().enumerate().all(|(h, &kv)| kv == h / g)
    }
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
        let d = self.d_model;
        let hd = self.head_dim;
        self.blocks
            .iter()
            .map(|b| 2 * d + d * b.n_heads * hd * 2 + d * b.n_kv_heads * hd * 2 + 3 * d * b.ffn_dim)
            .sum::<usize>()
            + d
    }

    /// All parameters (embedding counted once when tied).
    pub fn total_params(&self) -> usize {
        let emb = self.vocab_size * self.d_model;
        self.non_embedding_params() + if self.tie_embeddings { emb } else { 2 * emb }
    }

    /// Parameters of the same architecture before pruning.
    pub fn dense_non_embedding_params(&self) -> usize {
        let mut dense = self.clone();
        dense.blocks =
            vec![BlockShape::dense(self.n_heads, self.n_kv_heads, self.ffn_dim); self.blocks.len()];
        dense.non_embedding_params()
    }

    /// Fraction of non-embedding parameters removed relative to the dense architecture.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.non_embedding_params() as f64 / self.dense_non_embedding_params() as f64
    }
}

/// Weights of one decoder block, `[in, out]` orientation.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor<1>,
    /// `[d_model, n_heads * head_dim]`
    pub wq: Tensor<2>,
    /// `[d_model, n_kv_heads * head_dim]`
    pub wk: Tensor<2>,
    /// `[d_model, n_kv_heads * head_dim]`
    pub wv: Tensor<2>,
    /// `[n_heads * head_dim, d_model]`
    pub wo: Tensor<2>,
    pub ffn_norm: Tensor<1>,
    /// `[d_model, ffn_dim]`
    pub w_gate: Tensor<2>,
    /// `[d_model, ffn_dim]`
    pub w_up: Tensor<2>,
    /// `[ffn_dim, d_model]`
    pub w_down: Tensor<2>,
}

/// The seven LoRA-adapted projections of a block, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

impl Block {
    pub fn weight(&self, p: Proj) -> &Tensor<2> {
        match p {
            Proj::Q => &self.wq,
            Proj::K => &self.wk,
            Proj::V => &self.wv,
            Proj::O => &self.wo,
            Proj::Gate => &self.w_gate,
            Proj::Up => &self.w_up,
            Proj::Down => &self.w_down,
        }
    }
    pub fn weight_mut(&mut self, p: Proj) -> &mut Tensor<2> {
        match p {
            Proj::Q => &mut self.wq,
            Proj::K => &mut self.wk,
            Proj::V => &mut self.wv,
            Proj::O => &mut self.wo,
            Proj::Gate => &mut self.w_gate,
            Proj::Up => &mut self.w_up,
            Proj::Down => &mut self.w_down,
        }
    }
}

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

/// Cached keys and values of one block, `[batch, n_kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            len: 0,
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A LLaMA-architecture decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// `[vocab, d_model]`
    pub embed: Tensor<2>,
    pub blocks: Vec<Block>,
    pub norm: Tensor<1>,
    /// `[d_model, vocab]` when untied.
    pub lm_head: Option<Tensor<2>>,
    pub rope: Rope,
    /// Per block, the KV index of each query head, as an index tensor for `select`.
    q_to_kv: Vec<Tensor<1, Int>>,
    pub device: Device,
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

pub(crate) type LoraRef<'a> = Option<(&'a Tensor<2>, &'a Tensor<2>, f64)>;

/// `x @ W (+ (x @ A) @ (scale * B))`; `x` is `[n, in]`.
#[inline]
fn proj(x: Tensor<2>, w: &Tensor<2>, lora: LoraRef) -> Tensor<2> {
    let [out] = proj_group(x, [(w, lora)]);
    out
}

/// Several projections of the same input. When every one has a LoRA branch, their `A`
/// factors are joined so `x` is read once by one `[n, in] x [in, sum of ranks]` matmul instead
/// of one skinny matmul each; the scale is applied to the small `B` (`[r, out]`), not to the
/// `[n, out]` product.
fn proj_group<const N: usize>(x: Tensor<2>, parts: [(&Tensor<2>, LoraRef); N]) -> [Tensor<2>; N] {
    let mut low = lora_group(x.clone(), parts.map(|(_, l)| l)).into_iter();
    parts.map(|(w, _)| {
        let base = x.clone().matmul(w.clone());
        match low.next().flatten() {
            Some(d) => base + d,
            None => base,
        }
    })
}

/// The LoRA terms `(x @ A) @ (scale * B)` of [`proj_group`], `None` where a projection has no
/// adapter; the `A` factors are joined when every projection has one.
pub(crate) fn lora_group<const N: usize>(
    x: Tensor<2>,
    loras: [LoraRef; N],
) -> [Option<Tensor<2>>; N] {
    let all_lora = loras.iter().all(Option::is_some);
    let xa = if all_lora && N > 1 {
        let a: Vec<Tensor<2>> = loras
            .iter()
            .map(|l| l.map(|(a, _, _)| a.clone()).expect("checked"))
            .collect();
        Some(x.clone().matmul(Tensor::cat(a, 1)))
    } else {
        None
    };
    let mut offset = 0;
    loras.map(|lora| {
        lora.map(|(a, b, scale)| {
            let r = a.dims()[1];
            let low = match &xa {
                Some(xa) => xa.clone().narrow(1, offset, r),
                None => x.clone().matmul(a.clone()),
            };
            offset += r;
            low.matmul(b.clone().mul_scalar(scale))
        })
    })
}

impl Llama {
    /// Assemble a model from weights; validates every shape against the config.
    pub fn new(
        config: ModelConfig,
        embed: Tensor<2>,
        blocks: Vec<Block>,
        norm: Tensor<1>,
        lm_head: Option<Tensor<2>>,
        device: &Device,
    ) -> Result<Self, String> {
        let d = config.d_model;
        let hd = config.head_dim;
        if embed.dims() != [config.vocab_size, d] {
            return Err(format!(
                "embedding is {:?}, config says [{}, {d}]",
                embed.dims(),
                config.vocab_size
            ));
        }
        if blocks.len() != config.blocks.len() {
            return Err(format!(
                "{} blocks of weights, config has {}",
                blocks.len(),
                config.blocks.len()
            ));
        }
        for (i, (b, s)) in blocks.iter().zip(&config.blocks).enumerate() {
            let want: [(&str, [usize; 2], [usize; 2]); 7] = [
                ("q", b.wq.dims(), [d, s.n_heads * hd]),
                ("k", b.wk.dims(), [d, s.n_kv_heads * hd]),
                ("v", b.wv.dims(), [d, s.n_kv_heads * hd]),
                ("o", b.wo.dims(), [s.n_heads * hd, d]),
                ("gate", b.w_gate.dims(), [d, s.ffn_dim]),
                ("up", b.w_up.dims(), [d, s.ffn_dim]),
                ("down", b.w_down.dims(), [s.ffn_dim, d]),
            ];
            for (name, got, exp) in want {
                if got != exp {
                    return Err(format!(
                        "block {i} {name}: weight is {got:?}, expected {exp:?}"
                    ));
                }
            }
            if s.q_to_kv.len() != s.n_heads || s.q_to_kv.iter().any(|&k| k >= s.n_kv_heads) {
                return Err(format!("block {i}: query->KV map {:?} invalid", s.q_to_kv));
            }
        }
        if config.tie_embeddings != lm_head.is_none() {
            return Err("tie_embeddings disagrees with the presence of an LM head".into());
        }
        let q_to_kv = config
            .blocks
            .iter()
            .map(|s| {
                let idx: Vec<i64> = s.q_to_kv.iter().map(|&k| k as i64).collect();
                Tensor::<1, Int>::from_data(TensorData::new(idx, [s.n_heads]), device)
            })
            .collect();
        let rope = Rope::new(hd, config.max_seq_len, config.rope_theta, device);
        Ok(Llama {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            q_to_kv,
            device: device.clone(),
        })
    }

    /// Replace block `i`'s weights and shape (used by pruning).
    pub fn set_block(&mut self, i: usize, block: Block, shape: BlockShape) {
        let idx: Vec<i64> = shape.q_to_kv.iter().map(|&k| k as i64).collect();
        self.q_to_kv[i] = Tensor::from_data(TensorData::new(idx, [shape.n_heads]), &self.device);
        self.blocks[i] = block;
        self.config.blocks[i] = shape;
    }

    /// A model with random weights (for tests on tiny configs).
    pub fn random(config: ModelConfig, seed: u64, device: &Device) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut mat = |r: usize, c: usize, std: f32| -> Tensor<2> {
            let v: Vec<f32> = (0..r * c)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732)
                .collect();
            Tensor::from_data(TensorData::new(v, [r, c]), device)
        };
        let d = config.d_model;
        let hd = config.head_dim;
        let std = 1.0 / (d as f32).sqrt();
        let embed = mat(config.vocab_size, d, 1.0);
        let blocks = config
            .blocks
            .iter()
            .map(|s| Block {
                attn_norm: Tensor::ones([d], device),
                wq: mat(d, s.n_heads * hd, std),
                wk: mat(d, s.n_kv_heads * hd, std),
                wv: mat(d, s.n_kv_heads * hd, std),
                wo: mat(s.n_heads * hd, d, std),
                ffn_norm: Tensor::ones([d], device),
                w_gate: mat(d, s.ffn_dim, std),
                w_up: mat(d, s.ffn_dim, std),
                w_down: mat(s.ffn_dim, d, 1.0 / (s.ffn_dim as f32).sqrt()),
            })
            .collect();
        let lm_head = (!config.tie_embeddings).then(|| mat(d, config.vocab_size, std));
        Llama::new(
            config,
            embed,
            blocks,
            Tensor::ones([d], device),
            lm_head,
            device,
        )
        .expect("random weights match their own config")
    }

    /// Token ids `[batch, seq]` as an index tensor.
    pub fn tokens_tensor(&self, ids: &[Vec<u32>]) -> Tensor<2, Int> {
        let b = ids.len();
        let s = ids.first().map_or(0, Vec::len);
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        Tensor::from_data(TensorData::new(flat, [b, s]), &self.device)
    }

    /// Final hidden states after the last norm.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`
    /// - returns: `[batch * seq, d_model]` (row `b * seq + t`)
    pub fn hidden(
        &self,
        tokens: Tensor<2, Int>,
        adapter: Option<&Adapter>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        let cfg = &self.config;
        let start = cache.as_ref().map_or(0, |c| c.len);
        assert!(
            start + seq <= cfg.max_seq_len,
            "sequence of {} tokens exceeds the model's context of {}",
            start + seq,
            cfg.max_seq_len
        );
        let mut x = self.embed_tokens(tokens);
        for l in 0..self.blocks.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.block_forward(l, x, adapter, slot, start, batch, seq);
        }
        if let Some(c) = cache {
            c.len += seq;
        }
        self.final_norm(x)
    }

    /// Token embeddings: `[batch, seq]` -> `[batch * seq, d_model]`.
    pub fn embed_tokens(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [batch, seq] = tokens.dims();
        embedding(self.embed.clone(), tokens).reshape([batch * seq, self.config.d_model])
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: Tensor<2>) -> Tensor<2> {
        rms_norm(x, &self.norm, self.config.rms_eps)
    }

    /// One decoder block (attention and MLP with their residuals) on rows `[batch * seq, d]`
    /// at positions `start..start + seq`, appending to the block's KV cache slot if given.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward(
        &self,
        l: usize,
        mut x: Tensor<2>,
        adapter: Option<&Adapter>,
        cache_layer: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
        start: usize,
        batch: usize,
        seq: usize,
    ) -> Tensor<2> {
        let cfg = &self.config;
        let hd = cfg.head_dim;
        let (blk, shape) = (&self.blocks[l], &cfg.blocks[l]);
        let lora = |p: Proj| adapter.and_then(|a| a.factors(l, p));
        let h = rms_norm(x.clone(), &blk.attn_norm, cfg.rms_eps);
        let (nh, nkv) = (shape.n_heads, shape.n_kv_heads);
        let attn_out = if nh == 0 {
            None
        } else {
            let [q, k, v] = proj_group(
                h,
                [
                    (&blk.wq, lora(Proj::Q)),
                    (&blk.wk, lora(Proj::K)),
                    (&blk.wv, lora(Proj::V)),
                ],
            );
            let q = q.reshape([batch, seq, nh, hd]).swap_dims(1, 2);
            let k = k.reshape([batch, seq, nkv, hd]).swap_dims(1, 2);
            let v = v.reshape([batch, seq, nkv, hd]).swap_dims(1, 2);
            let q = self.rope.apply(q, start);
            let k = self.rope.apply(k, start);
            let (k, v) = match cache_layer {
                Some(c) => {
                    let (k, v) = match c.take() {
                        Some((pk, pv)) => {
                            (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2))
                        }
                        None => (k, v),
                    };
                    *c = Some((k.clone(), v.clone()));
                    (k, v)
                }
                None => (k, v),
            };
            // Expand KV heads to one per query head (GQA): equal consecutive groups repeat
            // each KV head (whose backward is a cheap sum), any other map selects by index.
            let (k, v) = if nkv == nh && shape.q_to_kv.iter().enumerate().all(|(i, &k)| i == k) {
                (k, v)
            } else if shape.uniform_groups() {
                let g = nh / nkv;
                let t = k.dims()[2];
                let rep = |x: Tensor<4>| {
                    x.reshape([batch, nkv, 1, t * hd])
                        .repeat_dim(2, g)
                        .reshape([batch, nh, t, hd])
                };
                (rep(k), rep(v))
            } else {
                (
                    k.select(1, self.q_to_kv[l].clone()),
                    v.select(1, self.q_to_kv[l].clone()),
                )
            };
            let o = causal_attention(q, k, v)
                .swap_dims(1, 2)
                .reshape([batch * seq, nh * hd]);
            Some(proj(o, &blk.wo, lora(Proj::O)))
        };
        if let Some(a) = attn_out {
            x = x + a;
        }
        if shape.ffn_dim > 0 {
            let h = rms_norm(x.clone(), &blk.ffn_norm, cfg.rms_eps);
            let [g, u] = proj_group(
                h,
                [(&blk.w_gate, lora(Proj::Gate)), (&blk.w_up, lora(Proj::Up))],
            );
            x = x + proj(silu_fused(g) * u, &blk.w_down, lora(Proj::Down));
        }
        x
    }

    /// Logits for hidden rows `[n, d_model]` -> `[n, vocab]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        match &self.lm_head {
            Some(w) => hidden.matmul(w.clone()),
            None => hidden.matmul(self.embed.clone().transpose()),
        }
    }

    /// Full forward: logits `[batch * seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, adapter: Option<&Adapter>) -> Tensor<2> {
        self.logits(self.hidden(tokens, adapter, None))
    }
}

/// Logits as a host vector `[rows][vocab]`.
pub fn to_rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, v] = t.dims();
    let data: Vec<f32> = t
        .into_data()
        .try_to_vec()
        .expect("float tensor converts to f32");
    data.chunks(v).map(<[f32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n_layers: usize) -> ModelConfig {
        let mut c = ModelConfig::dense(61, 32, n_layers, 4, 2, 8, 48, true);
        c.max_seq_len = 64;
        c
    }

    fn dev() -> Device {
        Device::flex()
    }

    #[test]
    fn output_shapes() {
        let m = Llama::random(tiny(2), 1, &dev());
        let toks = m.tokens_tensor(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]]);
        let logits = m.forward(toks, None);
        assert_eq!(logits.dims(), [10, 61]);
        let mut c = tiny(2);
        c.tie_embeddings = false;
        let m = Llama::random(c, 1, &dev());
        let logits = m.forward(m.tokens_tensor(&[vec![1, 2, 3]]), None);
        assert_eq!(logits.dims(), [3, 61]);
    }

    #[test]
    fn kv_cache_decoding_equals_full_sequence() {
        let m = Llama::random(tiny(3), 7, &dev());
        let ids: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8];
        let full = to_rows(m.forward(m.tokens_tensor(&[ids.clone()]), None));
        let mut cache = KvCache::new(3);
        // Prefill 5 tokens, then one at a time.
        let mut rows = to_rows(m.logits(m.hidden(
            m.tokens_tensor(&[ids[..5].to_vec()]),
            None,
            Some(&mut cache),
        )));
        for &t in &ids[5..] {
            rows.extend(to_rows(m.logits(m.hidden(
                m.tokens_tensor(&[vec![t]]),
                None,
                Some(&mut cache),
            ))));
        }
        assert_eq!(cache.len(), ids.len());
        for (a, b) in full.iter().zip(&rows) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn unequal_blocks_run() {
        let mut c = tiny(3);
        c.blocks[0] = BlockShape {
            n_heads: 3,
            n_kv_heads: 2,
            ffn_dim: 20,
            q_to_kv: vec![0, 1, 1],
        };
        c.blocks[1] = BlockShape {
            n_heads: 1,
            n_kv_heads: 1,
            ffn_dim: 48,
            q_to_kv: vec![0],
        };
        c.blocks[2] = BlockShape {
            n_heads: 0,
            n_kv_heads: 0,
            ffn_dim: 0,
            q_to_kv: vec![],
        };
        assert!(c.sparsity() > 0.3);
        let m = Llama::random(c, 3, &dev());
        let rows = to_rows(m.forward(m.tokens_tensor(&[vec![1, 2, 3, 4]]), None));
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn param_counts_match_smollm2() {
        let c = ModelConfig::dense(49152, 576, 30, 9, 3, 64, 1536, true);
        // 134,515,008 parameters in SmolLM2-135M.
        assert_eq!(c.total_params(), 134_515_008);
        assert_eq!(c.sparsity(), 0.0);
    }
}
