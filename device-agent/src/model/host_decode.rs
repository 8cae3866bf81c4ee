//! Decoding one new position per sequence on the host: the whole token (embedding, every
//! block, the LM head) over plain buffers instead of burn tensors, for a quantized or an fp32
//! base on flex.
//!
//! A decoded token through [`Llama::hidden`] runs about 40 small tensor operations per block
//! (RMSNorm and rotary embeddings alone are 17), each allocating its output and dispatching on
//! a `[1, 576]`-sized tensor; next to the weights' products that bookkeeping was a sizeable
//! share of a token (a quarter of Q8_0 decoding's; about 15% of fp32's, whose products read
//! four times the bytes). Here a block is: RMSNorm ([`kernels::rms_norm_into`]), one product
//! group for q, k and v, the LoRA branches, rotary embeddings in place, the KV cache's host
//! buffers appended and attended in place, the output projection, RMSNorm, gate and up
//! together, SwiGLU, down. The products are the tensor path's own: int8 products of
//! activations quantized once per group for a quantized base ([`matmul_many_q`]), the skinny
//! fp32 kernels reading flex's buffers in place for an fp32 one ([`kernels::skinny_products`],
//! bit for bit the tensor path's). RMSNorm's sum and the LoRA products may round differently,
//! so the logits agree to float rounding: tested against [`Llama::hidden`] for both bases with
//! equal and uneven KV maps, a block without attention, and an adapter. The decoder holds a
//! [`Team`] and enters it for each token, so the token's parallel sections run on helper
//! threads that spin between them rather than on rayon workers woken for each one.
//!
//! It applies only where the tensor path would read host buffers anyway: a quantized or fp32
//! (not bf16) base on flex, and a cache that a prompt has filled through [`Llama::hidden`]
//! (every block with attention holds [`LayerKv::Host`] buffers for this batch). Elsewhere
//! [`HostDecoder::new`] or [`HostDecoder::logits`] return `None` and the caller takes the
//! tensor path.

use protocol::Proj;

use super::kv_cache::{host_values, KvCache, LayerKv};
use super::layers::rope_angles;
use super::lora_layer::Adapter;
use super::Llama;
use crate::bf16::Precision;
use crate::cpu::DotPath;
use crate::kernels::team::Team;
use crate::kernels::{self, SkinnyWeight};
use crate::quant::{matmul_many_q, QMatrix, QRows, QuantBase};

/// One projection's LoRA branch in host buffers: `a` is `[in, rank]`, `b` is `[rank, out]`
/// already multiplied by the adapter's scale (`alpha / rank`).
struct HostLora {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
}

/// The fp32 base as the skinny kernels read it: flex's buffers, shared, not copied.
struct F32Base {
    /// `[block][Proj::index()]`.
    proj: Vec<Vec<SkinnyWeight>>,
    /// The embedding `[vocab, d]` held as its transpose: the tied LM head, and rows to look up.
    embed: SkinnyWeight,
    /// An untied LM head `[d, vocab]`.
    head: Option<SkinnyWeight>,
}

impl F32Base {
    /// `None` where any weight is not a contiguous flex f32 tensor without autodiff.
    fn of(model: &Llama) -> Option<Self> {
        let proj = model
            .blocks
            .iter()
            .map(|b| {
                Proj::ALL
                    .iter()
                    .map(|&p| SkinnyWeight::of(b.weight(p)))
                    .collect()
            })
            .collect::<Option<_>>()?;
        let head = match &model.lm_head {
            Some(w) => Some(SkinnyWeight::of(w)?),
            None => None,
        };
        Some(F32Base {
            proj,
            embed: SkinnyWeight::of(&model.embed.clone().transpose())?,
            head,
        })
    }
}

/// Where a decoded token's base products come from.
enum BaseWeights<'m> {
    /// A quantized base: int8 products, activations quantized once per product group.
    Quant(&'m QuantBase, DotPath),
    /// An fp32 base.
    F32(Box<F32Base>),
}

/// A model's decoding state that does not change between tokens: the norms' weights and the
/// adapter's factors copied to the host once per generation.
pub struct HostDecoder<'m> {
    model: &'m Llama,
    weights: BaseWeights<'m>,
    attn_norm: Vec<Vec<f32>>,
    ffn_norm: Vec<Vec<f32>>,
    norm: Vec<f32>,
    /// `[block][Proj::index()]`, `None` where the projection has no adapter.
    lora: Vec<Vec<Option<HostLora>>>,
    /// Helper threads that spin between a token's parallel sections (one per core beside
    /// the caller), parked when the decoder is idle.
    team: Team,
}

impl<'m> HostDecoder<'m> {
    /// The decoder of `model` with `adapter`, or `None` where it does not apply (a backend
    /// other than flex, a bf16 base, or fp32 weights that flex does not hold contiguous).
    pub fn new(model: &'m Llama, adapter: Option<&Adapter>) -> Option<Self> {
        if !crate::backend::is_flex(&model.device) {
            return None;
        }
        let weights = match model.quant.as_deref() {
            Some(base) => BaseWeights::Quant(base, DotPath::detect()),
            None if model.precision == Precision::Fp32 => {
                BaseWeights::F32(Box::new(F32Base::of(model)?))
            }
            None => return None,
        };
        let lora = (0..model.blocks.len())
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        let (a, b, scale) = adapter?.factors(l, p)?;
                        let rank = a.dims()[1];
                        let b = host_values(b.clone())
                            .iter()
                            .map(|&v| v * scale as f32)
                            .collect();
                        Some(HostLora {
                            a: host_values(a.clone()),
                            b,
                            rank,
                        })
                    })
                    .collect()
            })
            .collect();
        Some(HostDecoder {
            model,
            weights,
            attn_norm: model
                .blocks
                .iter()
                .map(|b| host_values(b.attn_norm.clone()))
                .collect(),
            ffn_norm: model
                .blocks
                .iter()
                .map(|b| host_values(b.ffn_norm.clone()))
                .collect(),
            norm: host_values(model.norm.clone()),
            lora,
            team: Team::for_pool(),
        })
    }

    /// Append one token per sequence (`ids[b]` for sequence `b`) at the cache's next position
    /// and return their logits, `[ids.len(), vocab]` row-major; `None`, with nothing changed,
    /// when the cache is not in host buffers for this batch (no prompt yet, or another batch).
    ///
    /// # Panics
    /// As [`Llama::hidden`]: past the model's context, or a token id outside the vocabulary.
    pub fn logits(&self, ids: &[u32], cache: &mut KvCache) -> Option<Vec<f32>> {
        self.team.enter(|| self.logits_here(ids, cache))
    }

    /// [`Self::logits`] on the entered team.
    fn logits_here(&self, ids: &[u32], cache: &mut KvCache) -> Option<Vec<f32>> {
        let cfg = &self.model.config;
        let batch = ids.len();
        let ready = cfg.blocks.iter().zip(&cache.layers).all(|(s, c)| match c {
            _ if s.n_heads == 0 => true,
            LayerKv::Host(h) => h.batch() == batch,
            LayerKv::Empty | LayerKv::Tensors(..) => false,
        });
        if batch == 0 || cache.layers.len() != cfg.blocks.len() || !ready {
            return None;
        }
        let pos = cache.len;
        assert!(
            pos < cfg.max_seq_len,
            "sequence of {} tokens exceeds the model's context of {}",
            pos + 1,
            cfg.max_seq_len
        );
        let (d, hd, eps) = (cfg.d_model, cfg.head_dim, cfg.rms_eps as f32);
        let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        let mut x = self.embed_rows(&ids);
        let (cos, sin): (Vec<f32>, Vec<f32>) = rope_angles(hd, pos, cfg.rope_theta).unzip();
        let mut h = vec![0f32; batch * d];
        for (l, s) in cfg.blocks.iter().enumerate() {
            if s.n_heads > 0 {
                kernels::rms_norm_into(&x, &self.attn_norm[l], &mut h, eps);
                let [mut q, mut k, v] = self.project(l, &h, [Proj::Q, Proj::K, Proj::V]);
                rotate(&mut q, &cos, &sin);
                rotate(&mut k, &cos, &sin);
                let LayerKv::Host(kv) = &mut cache.layers[l] else {
                    unreachable!("checked above: every block with attention holds host buffers")
                };
                kv.append(&k, &v, 1);
                let o = kv.attend(&q, &s.q_to_kv);
                let [o] = self.project(l, &o, [Proj::O]);
                add(&mut x, &o);
            }
            if s.ffn_dim > 0 {
                kernels::rms_norm_into(&x, &self.ffn_norm[l], &mut h, eps);
                let [g, u] = self.project(l, &h, [Proj::Gate, Proj::Up]);
                let mut act = vec![0f32; g.len()];
                kernels::swiglu_into(&g, &u, &mut act);
                let [down] = self.project(l, &act, [Proj::Down]);
                add(&mut x, &down);
            }
        }
        cache.len += 1;
        kernels::rms_norm_into(&x, &self.norm, &mut h, eps);
        Some(match &self.weights {
            BaseWeights::Quant(base, path) => {
                let head = base.lm_head.as_ref().unwrap_or(&base.embed);
                quant_products(*path, &[head], &h).remove(0)
            }
            BaseWeights::F32(f) => {
                let head = f.head.as_ref().unwrap_or(&f.embed);
                kernels::skinny_products(&h, &[head]).remove(0)
            }
        })
    }

    /// The embeddings of `ids`, `[ids.len(), d_model]` row-major.
    fn embed_rows(&self, ids: &[i64]) -> Vec<f32> {
        match &self.weights {
            BaseWeights::Quant(base, _) => base.embed_rows(ids),
            BaseWeights::F32(f) => ids
                .iter()
                .flat_map(|&t| {
                    usize::try_from(t)
                        .ok()
                        .and_then(|t| f.embed.transposed_row(t))
                        .unwrap_or_else(|| {
                            panic!("token id {t} outside the vocabulary of {}", f.embed.width())
                        })
                        .iter()
                        .copied()
                })
                .collect(),
        }
    }

    /// Rows `x` (`[n, in]`) through the projections `projs` of block `l` (one product group),
    /// each plus its LoRA branch.
    fn project<const N: usize>(&self, l: usize, x: &[f32], projs: [Proj; N]) -> [Vec<f32>; N] {
        let mut outs = match &self.weights {
            BaseWeights::Quant(base, path) => {
                quant_products(*path, &projs.map(|p| &**base.proj(l, p)), x)
            }
            BaseWeights::F32(f) => {
                kernels::skinny_products(x, &projs.map(|p| &f.proj[l][p.index()]))
            }
        }
        .into_iter();
        projs.map(|p| {
            let mut y = outs.next().expect("one product per projection");
            if let Some(f) = &self.lora[l][p.index()] {
                add_low_rank(&mut y, x, f);
            }
            y
        })
    }
}

/// `x` (`[n, cols]`, every matrix `cols` wide) times each quantized matrix, `[n, rows]` each,
/// the activations quantized once.
fn quant_products(path: DotPath, mats: &[&QMatrix], x: &[f32]) -> Vec<Vec<f32>> {
    let cols = mats[0].cols();
    let n = x.len() / cols.max(1);
    let qx = QRows::quantize(x, n, cols)
        .unwrap_or_else(|e| panic!("quantized base while decoding on the host: {e}"));
    matmul_many_q(path, mats, &qx)
}

/// Rotary embeddings in place on rows of whole heads (`x` is `[n, heads * hd]`, `cos` and
/// `sin` one position's `hd / 2` angles): the tensor path's `x * cos + rotate_half(x) * sin`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (x1, x2) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] + -b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `y += (x @ a) @ b` for rows `x` (`[n, in]`) and `y` (`[n, out]`).
fn add_low_rank(y: &mut [f32], x: &[f32], f: &HostLora) {
    let r = f.rank;
    if r == 0 {
        return;
    }
    let (din, dout) = (f.a.len() / r, f.b.len() / r);
    let mut xa = vec![0f32; r];
    for (xr, yr) in x.chunks_exact(din).zip(y.chunks_exact_mut(dout)) {
        xa.fill(0.0);
        for (&v, ar) in xr.iter().zip(f.a.chunks_exact(r)) {
            for (s, &w) in xa.iter_mut().zip(ar) {
                *s += v * w;
            }
        }
        for (&s, br) in xa.iter().zip(f.b.chunks_exact(dout)) {
            for (o, &w) in yr.iter_mut().zip(br) {
                *o += s * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::model::{to_rows, BlockShape, ModelConfig};
    use crate::quant::BasePrecision;

    fn tiny(tie: bool) -> ModelConfig {
        // d_model 64 and ffn 80: the MLP's input width is not a multiple of 32.
        let mut c = ModelConfig::dense(97, 64, 3, 4, 2, 16, 80, tie);
        c.max_seq_len = 64;
        c
    }

    /// A seeded adapter whose `B` factors are not zero, so every LoRA branch contributes.
    fn adapter(cfg: &ModelConfig, device: &Device) -> Adapter {
        let mut a = Adapter::new(cfg, 4, 8.0, 3, device);
        let mut k = 0u32;
        for f in a.blocks.iter_mut().flatten() {
            let dims = f.b.dims();
            let v: Vec<f32> = (0..dims[0] * dims[1])
                .map(|_| {
                    k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    ((k >> 16) % 1000) as f32 / 1000.0 * 0.2 - 0.1
                })
                .collect();
            f.b = Tensor::from_data(TensorData::new(v, dims), device);
        }
        a
    }

    /// Host decoding gives the tensor path's logits: two sequences after a 5-token prompt, 14
    /// decoded tokens (past the buffers' first growth at 16 positions), tied and untied heads,
    /// equal KV groups and a pruned model with an uneven map and a block without attention,
    /// with and without an adapter, a Q8_0 and an fp32 base. And it declines a cache no prompt
    /// has filled.
    ///
    /// An fp32 base's products are the tensor path's bit for bit; only RMSNorm's sum and the
    /// LoRA products round differently, so its tolerance is 1e-5 of the largest logit. For Q8_0
    /// the tolerance is 1% of the largest logit: both paths quantize their activations to Q8_0,
    /// and a value on a rounding boundary goes to the other integer under a last-bit difference
    /// (RMSNorm's and the LoRA products' summation order), which moves every later logit a
    /// little (0.35% seen here, with the adapter). What this test exists to catch is far larger:
    /// swapping the rotary `cos` and `sin` of the keys fails it at 21%, dropping the LoRA branch
    /// of `v` at 6.5%; without an adapter the paths agreed to 2e-7 of the largest logit.
    #[test]
    #[allow(clippy::needless_range_loop)] // `t` indexes both sequences and names the position
    fn host_decoding_equals_the_tensor_path() {
        let device = Device::flex();
        for tie in [true, false] {
            let mut pruned = tiny(tie);
            pruned.blocks[0] = BlockShape {
                n_heads: 3,
                n_kv_heads: 2,
                ffn_dim: 40,
                q_to_kv: vec![0, 1, 1],
            };
            pruned.blocks[1] = BlockShape {
                n_heads: 0,
                n_kv_heads: 0,
                ffn_dim: 48,
                q_to_kv: vec![],
            };
            let cases = [("equal groups", tiny(tie)), ("pruned", pruned)];
            for ((what, cfg), base) in cases
                .iter()
                .flat_map(|c| [(c, BasePrecision::Q8_0), (c, BasePrecision::F32)])
            {
                let mut m = Llama::random(cfg.clone(), 11, &device);
                let tolerance = if base == BasePrecision::F32 {
                    1e-5
                } else {
                    m.set_base_precision(base).unwrap().expect("quantized");
                    1e-2
                };
                let lora = adapter(cfg, &device);
                for ad in [None, Some(&lora)] {
                    let dec = HostDecoder::new(&m, ad).expect("on flex");
                    let seqs: Vec<Vec<u32>> = (0..2u32)
                        .map(|b| (0..19u32).map(|i| (i * 7 + b * 13 + 3) % 97).collect())
                        .collect();
                    let prompt: Vec<Vec<u32>> = seqs.iter().map(|s| s[..5].to_vec()).collect();
                    let mut fresh = KvCache::new(3);
                    assert!(dec.logits(&[1, 2], &mut fresh).is_none());
                    assert_eq!(fresh.len(), 0);
                    let (mut ct, mut ch) = (KvCache::new(3), KvCache::new(3));
                    for c in [&mut ct, &mut ch] {
                        m.hidden(m.tokens_tensor(&prompt), ad, Some(c));
                    }
                    assert!(dec.logits(&[1, 2, 3], &mut ch).is_none(), "another batch");
                    for t in 5..19 {
                        let ids = [seqs[0][t], seqs[1][t]];
                        let want = to_rows(m.logits(m.hidden(
                            m.tokens_tensor(&[vec![ids[0]], vec![ids[1]]]),
                            ad,
                            Some(&mut ct),
                        )));
                        let got = dec.logits(&ids, &mut ch).expect("host buffers");
                        let scale = want.iter().flatten().fold(0f32, |s, v| s.max(v.abs()));
                        let worst = want
                            .iter()
                            .flatten()
                            .zip(&got)
                            .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
                        assert!(
                            worst <= tolerance * scale,
                            "{what}, {base:?}, tie {tie}, adapter {}, position {t}: {worst} of \
                             {scale}",
                            ad.is_some()
                        );
                    }
                    assert_eq!(ch.len(), 19);
                }
            }
        }
    }
}
