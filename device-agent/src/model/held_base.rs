//! The frozen base held quantized ([`crate::quant`]): holding a loaded model's base in blocks,
//! assembling a model around a base read as blocks ([`Llama::with_held_base`]), and the fp32
//! views of a held base that slicing, merging and training take.

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use protocol::Proj;

use super::{Block, BlockShape, Llama, ModelConfig};
use crate::quant::{
    self, BasePrecision, QMatrix, QuantArithmetic, QuantBase, QuantError, QuantReport,
};

impl Llama {
    /// Assemble a model around a frozen base already held in blocks (read from a file's own
    /// blocks by [`crate::weights::load_gguf_held`]): `norms` are each block's attention and
    /// MLP norms, `norm` the final one. The config is checked ([`ModelConfig::check`]) and every
    /// matrix's shape against it; the fp32 weight tensors are empty, as after
    /// [`Self::set_base_precision`].
    pub fn with_held_base(
        config: ModelConfig,
        base: QuantBase,
        norms: Vec<(Tensor<1>, Tensor<1>)>,
        norm: Tensor<1>,
        device: &Device,
    ) -> Result<Self, String> {
        config.check()?;
        let (d, hd, vocab) = (config.d_model, config.head_dim, config.vocab_size);
        let rows_cols = |m: &QMatrix| [m.rows(), m.cols()];
        if rows_cols(&base.embed) != [vocab, d] {
            return Err(format!(
                "embedding is {:?}, config says [{vocab}, {d}]",
                rows_cols(&base.embed)
            ));
        }
        match &base.lm_head {
            Some(h) if rows_cols(h) != [vocab, d] => {
                return Err(format!(
                    "LM head is {:?}, config says [{vocab}, {d}]",
                    rows_cols(h)
                ))
            }
            h if h.is_none() != config.tie_embeddings => {
                return Err("tie_embeddings disagrees with the presence of an LM head".into())
            }
            _ => {}
        }
        let n = config.blocks.len();
        if base.blocks.len() != n || norms.len() != n {
            return Err(format!(
                "{} blocks of weights and {} of norms, config has {n}",
                base.blocks.len(),
                norms.len()
            ));
        }
        let empty = || Tensor::<2>::zeros([0, 0], device);
        let mut blocks = Vec::with_capacity(n);
        for (i, ((mats, s), (attn_norm, ffn_norm))) in base
            .blocks
            .iter()
            .zip(&config.blocks)
            .zip(norms)
            .enumerate()
        {
            let (q, kv, f) = (s.n_heads * hd, s.n_kv_heads * hd, s.ffn_dim);
            // `[out, in]`, as the blocks hold them.
            let want = [[q, d], [kv, d], [kv, d], [d, q], [f, d], [f, d], [d, f]];
            for (p, exp) in Proj::ALL.into_iter().zip(want) {
                let got = mats.get(p.index()).map(|m| rows_cols(m));
                if got != Some(exp) {
                    return Err(format!(
                        "block {i} {p:?}: matrix is {got:?}, expected {exp:?}"
                    ));
                }
            }
            for (what, v) in [("attention", &attn_norm), ("MLP", &ffn_norm)] {
                if v.dims() != [d] {
                    return Err(format!(
                        "block {i} {what} norm is {:?}, expected [{d}]",
                        v.dims()
                    ));
                }
            }
            blocks.push(Block {
                attn_norm,
                wq: empty(),
                wk: empty(),
                wv: empty(),
                wo: empty(),
                ffn_norm,
                w_gate: empty(),
                w_up: empty(),
                w_down: empty(),
            });
        }
        let lm_head = base.lm_head.as_ref().map(|_| empty());
        Self::assemble(config, empty(), blocks, norm, lm_head, device, Some(base))
    }

    /// The quantized frozen base, when the model holds one.
    pub fn quant_base(&self) -> Option<&QuantBase> {
        self.quant.as_deref()
    }

    /// How products from a quantized base are computed (no effect on an fp32 base): for serving
    /// (the default) int8 for a decoded token's few rows and fp32 from the dequantized weights
    /// for a prompt's many ([`QuantArithmetic::Serving`]), fp32 throughout for training over it.
    pub fn set_quant_arithmetic(&mut self, arithmetic: QuantArithmetic) {
        self.quant_arithmetic = arithmetic;
    }

    /// The LM head of a Q8_0 base that products take in fp32 ([`QuantArithmetic::Fp32`]), `[vocab,
    /// d_model]`; `None` otherwise.
    pub fn quant_fp32_head(&self) -> Option<&QMatrix> {
        match &self.quant {
            Some(q) if self.quant_arithmetic == QuantArithmetic::Fp32 => {
                Some(q.lm_head.as_ref().unwrap_or(&q.embed))
            }
            _ => None,
        }
    }

    /// The LM head as `[vocab, d_model]` fp32 rows (the embedding table when tied); a Q8_0
    /// base's is dequantized for the caller, so a caller holds it only as long as it needs it.
    pub fn head_rows(&self) -> Tensor<2> {
        match (&self.quant, &self.lm_head) {
            (Some(q), _) => q
                .lm_head
                .as_ref()
                .unwrap_or(&q.embed)
                .dequantized(&self.device),
            (None, Some(w)) => w.clone().transpose(),
            (None, None) => self.embed.clone(),
        }
    }

    /// Projection `p`'s frozen weight in block `l` as fp32 `[in, out]`: the tensor itself, or a
    /// Q8_0 base's matrix dequantized.
    pub fn base_weight(&self, l: usize, p: Proj) -> Tensor<2> {
        match &self.quant {
            Some(q) => q.proj(l, p).dequantized(&self.device).transpose(),
            None => self.blocks[l].weight(p).clone(),
        }
    }

    /// Hold the frozen base at `precision`: quantize every projection to its blocks, and the
    /// embedding table and LM head to Q8_0 ([`crate::quant`]), and drop their fp32 tensors (the weight tensors
    /// become empty, so quantize last: after loading, slicing and merging). `None` for F32 or
    /// when already quantized.
    pub fn set_base_precision(
        &mut self,
        precision: BasePrecision,
    ) -> Result<Option<QuantReport>, QuantError> {
        let Some(format) = precision.format().filter(|_| self.quant.is_none()) else {
            return Ok(None);
        };
        let device = self.device.clone();
        let empty = || Tensor::<2>::zeros([0, 0], &device);
        let mut fp32 = 0usize;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &mut self.blocks {
            let mut mats = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let w = std::mem::replace(blk.weight_mut(p), empty());
                fp32 += 4 * w.dims().iter().product::<usize>();
                mats.push(Arc::new(QMatrix::from_in_out(format, w)?));
            }
            blocks.push(mats);
        }
        let [v, d] = self.embed.dims();
        let embed_t = std::mem::replace(&mut self.embed, empty());
        fp32 += 4 * v * d;
        let embed = QMatrix::from_rows(quant::TABLE_FORMAT, embed_t, v, d)?;
        let lm_head = match self.lm_head.take() {
            Some(w) => {
                fp32 += 4 * w.dims().iter().product::<usize>();
                let m = QMatrix::from_in_out(quant::TABLE_FORMAT, w)?;
                self.lm_head = Some(empty());
                Some(m)
            }
            None => None,
        };
        let base = QuantBase {
            embed,
            lm_head,
            blocks,
        };
        let q8 = base.bytes();
        self.quant = Some(Arc::new(base));
        quant::release_freed_memory();
        Ok(Some(QuantReport {
            fp32_bytes: fp32,
            quant_bytes: q8,
        }))
    }

    /// Block `i`'s weights in fp32 (a Q8_0 base's projections dequantized; see
    /// [`Self::base_weight`]).
    pub fn fp32_block(&self, i: usize) -> Block {
        let mut b = self.blocks[i].clone();
        if self.quant.is_some() {
            for p in Proj::ALL {
                *b.weight_mut(p) = self.base_weight(i, p);
            }
        }
        b
    }

    /// Replace block `i`'s weights and shape (used by pruning). A held base quantizes the new
    /// projections again: a block of 32 inputs that the slice kept whole comes back bit for bit
    /// when its blocks came from our rule (it is idempotent on its own output; a file's blocks
    /// read straight by [`crate::weights::load_gguf_held`] are re-rounded by it unless the
    /// file's rule is ours, as the default model's is), so otherwise only products whose inputs
    /// were cut inside a block (the down projection's channels) take a second rounding.
    pub fn set_block(&mut self, i: usize, mut block: Block, shape: BlockShape) {
        if let Some(q) = &mut self.quant {
            let base = Arc::make_mut(q);
            for p in Proj::ALL {
                let w = std::mem::replace(
                    block.weight_mut(p),
                    Tensor::<2>::zeros([0, 0], &self.device),
                );
                let format = base.blocks[i][p.index()].format();
                let m = QMatrix::from_in_out(format, w)
                    .unwrap_or_else(|e| panic!("block {i} {p:?} of a sliced {format} base: {e}"));
                base.blocks[i][p.index()] = Arc::new(m);
            }
        }
        let idx: Vec<i64> = shape.q_to_kv.iter().map(|&k| k as i64).collect();
        self.q_to_kv[i] = Tensor::from_data(TensorData::new(idx, [shape.n_heads]), &self.device);
        self.blocks[i] = block;
        self.config.blocks[i] = shape;
    }
}
