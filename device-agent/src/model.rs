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
//!
//! The submodules hold the pieces: [`config`] the hyper-parameters and block shapes,
//! [`layers`] the weightless building blocks (norm, rotary embeddings, attention, fused
//! activations), [`lora_layer`] the adapter's factors as a projection applies them. The seven
//! projections are named by [`protocol::Proj`], the same vocabulary the wire uses.

pub mod config;
mod held_base;
mod host_decode;
mod kv_cache;
pub mod layers;
pub mod lora_layer;
mod precision;

use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor, TensorData};
use protocol::Proj;

pub use config::{BlockShape, ModelConfig};
pub use host_decode::HostDecoder;
pub use kv_cache::{KvCache, LayerKv};
#[cfg(test)]
pub(crate) use layers::attention_by_ops;
pub(crate) use layers::rms_norm;
pub use layers::{causal_attention, Rope};
pub(crate) use lora_layer::{lora_group, LoraTerm};
use lora_layer::{proj, proj_group_normed, swiglu_proj, Adapter, Base};
use std::sync::Arc;

use crate::bf16::{self, Precision};
use crate::kernels::Layout;
use crate::quant::{QuantArithmetic, QuantBase};

/// The checkpoint's module name of a projection (`q_proj`, ..., `down_proj`), as Hugging Face
/// checkpoints and PEFT adapter files spell it.
pub fn module_name(p: Proj) -> &'static str {
    match p {
        Proj::Q => "q_proj",
        Proj::K => "k_proj",
        Proj::V => "v_proj",
        Proj::O => "o_proj",
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
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
    /// The frozen base in Q8_0 ([`crate::quant`]) when loaded with `--base-precision q8_0`;
    /// the fp32 weight tensors above are then empty.
    quant: Option<Arc<QuantBase>>,
    /// How products from `quant` are computed.
    quant_arithmetic: QuantArithmetic,
    /// The arithmetic of the fp32 base's matrix products ([`crate::bf16`]); resolved, so bf16
    /// only where the backend and the CPU run it.
    precision: Precision,
}

impl Llama {
    /// Assemble a model from weights; checks the config ([`ModelConfig::check`]) and every
    /// shape against it.
    pub fn new(
        config: ModelConfig,
        embed: Tensor<2>,
        blocks: Vec<Block>,
        norm: Tensor<1>,
        lm_head: Option<Tensor<2>>,
        device: &Device,
    ) -> Result<Self, String> {
        config.check()?;
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
        }
        if config.tie_embeddings != lm_head.is_none() {
            return Err("tie_embeddings disagrees with the presence of an LM head".into());
        }
        Self::assemble(config, embed, blocks, norm, lm_head, device, None)
    }

    /// The model from weights whose shapes were checked (fp32 ones by [`Self::new`], a held
    /// base's by [`Self::with_held_base`], after [`ModelConfig::check`]); checks the final norm.
    fn assemble(
        config: ModelConfig,
        embed: Tensor<2>,
        blocks: Vec<Block>,
        norm: Tensor<1>,
        lm_head: Option<Tensor<2>>,
        device: &Device,
        quant: Option<QuantBase>,
    ) -> Result<Self, String> {
        if norm.dims() != [config.d_model] {
            return Err(format!(
                "final norm is {:?}, expected [{}]",
                norm.dims(),
                config.d_model
            ));
        }
        let hd = config.head_dim;
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
            quant: quant.map(Arc::new),
            quant_arithmetic: QuantArithmetic::Serving,
            precision: Precision::Fp32,
        })
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
        cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        self.hidden_rows(tokens, adapter, cache, false)
    }

    /// Final hidden states after the last norm at each sequence's last position only, what
    /// the next token is sampled from. The last block's attention output, output projection
    /// and MLP are computed for those rows alone (every position's keys and values still go
    /// into `cache`): for a prompt of `seq` tokens that block's work after attention is
    /// `1 / seq` of [`Llama::hidden`]'s.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`
    /// - returns: `[batch, d_model]` (row `b`: sequence `b`'s position `seq - 1`)
    pub fn hidden_last(
        &self,
        tokens: Tensor<2, Int>,
        adapter: Option<&Adapter>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        self.hidden_rows(tokens, adapter, cache, true)
    }

    fn hidden_rows(
        &self,
        tokens: Tensor<2, Int>,
        adapter: Option<&Adapter>,
        mut cache: Option<&mut KvCache>,
        last_only: bool,
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
        let layers = self.blocks.len();
        for l in 0..layers {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let rows = if last_only && l + 1 == layers {
                Rows::Last
            } else {
                Rows::All
            };
            x = self.block_rows(l, x, adapter, slot, start, batch, seq, rows);
        }
        if last_only && layers == 0 {
            x = Rows::Last.of(x, batch, seq);
        }
        if let Some(c) = cache {
            c.len += seq;
        }
        self.final_norm(x)
    }

    /// Token embeddings: `[batch, seq]` -> `[batch * seq, d_model]`.
    pub fn embed_tokens(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        if let Some(q) = &self.quant {
            return q.embed_tokens(tokens);
        }
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
        x: Tensor<2>,
        adapter: Option<&Adapter>,
        cache_layer: Option<&mut LayerKv>,
        start: usize,
        batch: usize,
        seq: usize,
    ) -> Tensor<2> {
        self.block_rows(l, x, adapter, cache_layer, start, batch, seq, Rows::All)
    }

    /// [`Llama::block_forward`] whose output holds `rows` of its input's: with [`Rows::Last`]
    /// attention still reads (and caches) every position, and what follows it runs on the last
    /// position of each sequence alone.
    #[allow(clippy::too_many_arguments)]
    fn block_rows(
        &self,
        l: usize,
        mut x: Tensor<2>,
        adapter: Option<&Adapter>,
        cache_layer: Option<&mut LayerKv>,
        start: usize,
        batch: usize,
        seq: usize,
        rows: Rows,
    ) -> Tensor<2> {
        let cfg = &self.config;
        let hd = cfg.head_dim;
        let (blk, shape) = (&self.blocks[l], &cfg.blocks[l]);
        let lora = |p: Proj| adapter.and_then(|a| a.factors(l, p));
        let w = |p: Proj| match &self.quant {
            Some(q) if self.quant_arithmetic.fp32_for(batch * seq) => Base::QuantFp32(q.proj(l, p)),
            Some(q) => Base::Quant(q.proj(l, p)),
            None if self.precision == Precision::Bf16 => Base::Bf16(blk.weight(p)),
            None if self.precision == Precision::Int8 => Base::Int8(blk.weight(p)),
            None => Base::F32(blk.weight(p)),
        };
        let (nh, nkv) = (shape.n_heads, shape.n_kv_heads);
        let attn_out = if nh == 0 {
            None
        } else {
            let [q, k, v] = proj_group_normed(
                &x,
                &blk.attn_norm,
                cfg.rms_eps,
                [
                    (w(Proj::Q), lora(Proj::Q)),
                    (w(Proj::K), lora(Proj::K)),
                    (w(Proj::V), lora(Proj::V)),
                ],
            );
            // Rotated while the heads of a position are one row (one pass, see `Rope`).
            let q = self.rope.apply_rows(q, start, seq);
            let k = self.rope.apply_rows(k, start, seq);
            let q = q.reshape([batch, seq, nh, hd]).swap_dims(1, 2);
            let k = k.reshape([batch, seq, nkv, hd]).swap_dims(1, 2);
            let v = v.reshape([batch, seq, nkv, hd]).swap_dims(1, 2);
            // Equal consecutive groups read their KV head in place; any other map selects one
            // KV head per query head by index.
            let attend = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
                let (k, v) = if shape.uniform_groups() {
                    (k, v)
                } else {
                    (
                        k.select(1, self.q_to_kv[l].clone()),
                        v.select(1, self.q_to_kv[l].clone()),
                    )
                };
                let o = causal_attention(q, k, v);
                o.swap_dims(1, 2).reshape([batch * seq, nh * hd])
            };
            let o = match cache_layer {
                Some(c) => match c.append(k, v) {
                    Some((k, v)) => attend(q, k, v),
                    // One new position against host buffers: attention reads them in place.
                    None => c.decode(q, &shape.q_to_kv),
                },
                None => attend(q, k, v),
            };
            Some(proj(rows.of(o, batch, seq), w(Proj::O), lora(Proj::O)))
        };
        x = rows.of(x, batch, seq);
        if let Some(a) = attn_out {
            x = x + a;
        }
        if shape.ffn_dim > 0 {
            let [g, u] = proj_group_normed(
                &x,
                &blk.ffn_norm,
                cfg.rms_eps,
                [
                    (w(Proj::Gate), lora(Proj::Gate)),
                    (w(Proj::Up), lora(Proj::Up)),
                ],
            );
            x = x + swiglu_proj(g, u, w(Proj::Down), lora(Proj::Down));
        }
        x
    }

    /// Logits for hidden rows `[n, d_model]` -> `[n, vocab]`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        if let Some(q) = &self.quant {
            return if self.quant_arithmetic.fp32_for(hidden.dims()[0]) {
                crate::quant::frozen::logits(hidden, q.lm_head.as_ref().unwrap_or(&q.embed))
            } else {
                q.logits(hidden)
            };
        }
        let bf16 = self.precision == Precision::Bf16;
        match &self.lm_head {
            Some(w) if bf16 => bf16::matmul(hidden, w),
            // A few rows: the decoding kernels; up to 127: the head read in place where the CPU
            // has those kernels (no copy of its 28M values per call); else burn's product.
            Some(w) => crate::kernels::skinny_matmul(&hidden, w)
                .or_else(|| crate::kernels::sgemm::matmul(&hidden, w, Layout::Plain))
                .unwrap_or_else(|| hidden.matmul(w.clone())),
            None if bf16 => bf16::matmul_transposed(hidden, &self.embed),
            None => {
                let head = self.embed.clone().transpose();
                crate::kernels::skinny_matmul(&hidden, &head)
                    .or_else(|| {
                        crate::kernels::sgemm::matmul(&hidden, &self.embed, Layout::Transposed)
                    })
                    .unwrap_or_else(|| hidden.matmul(head))
            }
        }
    }

    /// Full forward: logits `[batch * seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, adapter: Option<&Adapter>) -> Tensor<2> {
        self.logits(self.hidden(tokens, adapter, None))
    }
}

/// Which rows of a block's input its output keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Every position of every sequence.
    All,
    /// The last position of each sequence (what the next token is sampled from).
    Last,
}

impl Rows {
    /// These rows of `t`, `[batch * seq, d]` in sequence-major order.
    fn of(self, t: Tensor<2>, batch: usize, seq: usize) -> Tensor<2> {
        match self {
            Rows::All => t,
            Rows::Last if seq <= 1 => t,
            Rows::Last if batch == 1 => t.narrow(0, seq - 1, 1),
            Rows::Last => {
                let idx: Vec<i64> = (0..batch).map(|b| (b * seq + seq - 1) as i64).collect();
                let device = t.device();
                t.select(0, Tensor::from_data(TensorData::new(idx, [batch]), &device))
            }
        }
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
mod tests;
