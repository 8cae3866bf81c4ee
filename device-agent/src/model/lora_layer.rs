//! LoRA on a projection: the factors of an [`Adapter`] and how a projection applies them,
//! `x @ W + (x @ a) @ (scale * b)` with `scale = alpha / rank`. Factors are stored in burn's
//! `[in, out]` orientation: `a` is `[in, rank]` and `b` is `[rank, out]`. Creating, resizing,
//! converting, merging and saving adapters is [`crate::lora`]'s business; this module is the
//! part the forward pass needs.

use std::sync::Arc;

use burn::tensor::Tensor;
use protocol::Proj;

use crate::fused;
use crate::quant::{self, QMatrix};

/// A projection's frozen base weight: fp32 `[in, out]` (multiplied in fp32, with bf16 operands:
/// [`crate::bf16`], or with int8 ones: [`crate::quant::rowwise`]), or GGUF `[out, in]` blocks (int8 products for serving, or fp32
/// products from the dequantized weight for training: [`quant::frozen`]).
#[derive(Clone, Copy)]
pub(crate) enum Base<'a> {
    F32(&'a Tensor<2>),
    Bf16(&'a Tensor<2>),
    /// fp32 `[in, out]` multiplied with int8 operands ([`crate::quant::rowwise`]).
    Int8(&'a Tensor<2>),
    Quant(&'a QMatrix),
    QuantFp32(&'a Arc<QMatrix>),
}

/// The factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `[in, rank]`
    pub a: Tensor<2>,
    /// `[rank, out]`
    pub b: Tensor<2>,
}

/// A LoRA adapter for a whole model: `blocks[l][proj.index()]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub rank: usize,
    pub alpha: f64,
    pub blocks: Vec<Vec<LoraFactors>>,
}

impl Adapter {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Factors and scale for block `l`, projection `p`.
    pub fn factors(&self, l: usize, p: Proj) -> Option<(&Tensor<2>, &Tensor<2>, f64)> {
        if self.rank == 0 {
            return None;
        }
        self.blocks
            .get(l)
            .and_then(|b| b.get(p.index()))
            .map(|f| (&f.a, &f.b, self.scale()))
    }
}

/// One projection's LoRA branch as the forward pass reads it: `(a, b, scale)`, `None` when the
/// projection has no adapter.
pub(crate) type LoraRef<'a> = Option<(&'a Tensor<2>, &'a Tensor<2>, f64)>;

/// `x @ W (+ (x @ A) @ (scale * B))`; `x` is `[n, in]`.
#[inline]
pub(crate) fn proj(x: Tensor<2>, w: Base, lora: LoraRef) -> Tensor<2> {
    let [out] = proj_group(x, [(w, lora)]);
    out
}

/// Several projections of the same input. When every one has a LoRA branch, their `A`
/// factors are joined so `x` is read once by one `[n, in] x [in, sum of ranks]` matmul instead
/// of one skinny matmul each; the scale is applied to the small `B` (`[r, out]`), not to the
/// `[n, out]` product. Q8_0 bases quantize `x` once for the whole group.
pub(crate) fn proj_group<const N: usize>(
    x: Tensor<2>,
    parts: [(Base, LoraRef); N],
) -> [Tensor<2>; N] {
    proj_group_of(x, Source::Kept, parts)
}

/// [`proj_group`] of RMSNorm's output `h = rms_norm(x, w, eps)` (what
/// [`crate::model::rms_norm`] returns): on flex the LoRA `A` product recomputes `h` from `x` in
/// the backward pass ([`fused::norm_matmul`]), so `h` is not kept for it.
pub(crate) fn proj_group_normed<const N: usize>(
    x: &Tensor<2>,
    w: &Tensor<1>,
    eps: f64,
    parts: [(Base, LoraRef); N],
) -> [Tensor<2>; N] {
    let h = crate::model::rms_norm(x.clone(), w, eps);
    proj_group_of(h, Source::Normed { x, w, eps }, parts)
}

/// Where a projection group's input came from, when the LoRA `A` product may recompute it.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Kept by the product as usual.
    Kept,
    /// RMSNorm of `x` with weight `w`.
    Normed {
        x: &'a Tensor<2>,
        w: &'a Tensor<1>,
        eps: f64,
    },
}

fn proj_group_of<const N: usize>(
    x: Tensor<2>,
    source: Source,
    parts: [(Base, LoraRef); N],
) -> [Tensor<2>; N] {
    let mut low = lora_group_of(x.clone(), source, parts.map(|(_, l)| l)).into_iter();
    let q8: Vec<&QMatrix> = parts
        .iter()
        .filter_map(|(w, _)| match w {
            Base::Quant(m) => Some(*m),
            Base::F32(_) | Base::Bf16(_) | Base::Int8(_) | Base::QuantFp32(_) => None,
        })
        .collect();
    let mut q8_out = if q8.is_empty() {
        Vec::new()
    } else {
        quant::expect_quant(quant::matmul_tensors(&q8, x.clone()))
    }
    .into_iter();
    // A decoded token's fp32 products of one input go through one parallel region.
    let fp32: Vec<&Tensor<2>> = parts
        .iter()
        .filter_map(|(w, _)| match w {
            Base::F32(m) => Some(*m),
            Base::Bf16(_) | Base::Int8(_) | Base::QuantFp32(_) | Base::Quant(_) => None,
        })
        .collect();
    let mut fp32_out = if N > 1 && fp32.len() == N {
        crate::kernels::skinny_matmul_group(&x, &fp32)
    } else {
        None
    }
    .map(Vec::into_iter);
    parts.map(|(w, _)| {
        let base = match (w, fp32_out.as_mut().and_then(Iterator::next)) {
            (_, Some(grouped)) => grouped,
            (Base::F32(_) | Base::Bf16(_) | Base::Int8(_) | Base::QuantFp32(_), None) => {
                dense_product(x.clone(), w)
            }
            (Base::Quant(_), None) => q8_out
                .next()
                .expect("one quantized product per quantized base"),
        };
        match low.next().flatten() {
            Some(term) => term.add_to(base),
            None => base,
        }
    })
}

/// `x @ W` in fp32 (an fp32 base in fp32 or with bf16 operands, or a Q8_0 base dequantized);
/// int8 products from a Q8_0 base go through [`quant::matmul_tensors`].
fn dense_product(x: Tensor<2>, w: Base) -> Tensor<2> {
    match w {
        // A weight that takes gradients (Taylor importance) goes through burn's own product.
        Base::F32(w) => crate::kernels::skinny_matmul(&x, w)
            .or_else(|| (!w.is_tracked()).then(|| crate::bf16::matmul_fp32(x.clone(), w))?)
            .unwrap_or_else(|| x.matmul(w.clone())),
        Base::Bf16(w) => crate::bf16::matmul(x, w),
        // A weight that takes gradients (Taylor importance) keeps burn's fp32 product.
        Base::Int8(w) if w.is_tracked() => x.matmul(w.clone()),
        Base::Int8(w) => match crate::bf16::matmul_int8(x.clone(), w) {
            Some(y) => y,
            None => x.matmul(w.clone()),
        },
        Base::QuantFp32(w) => quant::frozen::matmul(x, w),
        Base::Quant(_) => unreachable!("Q8_0 products are taken per group by proj_group"),
    }
}

/// The down projection of SwiGLU, `proj(silu(g) * u, w, lora)`. On flex with an fp32 base the
/// LoRA `A` product goes through [`fused::swiglu_matmul`], so the `[n, ffn]` SwiGLU output is
/// not kept for the backward pass (it is recomputed from `g` and `u`, which SwiGLU keeps).
pub(crate) fn swiglu_proj(g: Tensor<2>, u: Tensor<2>, w: Base, lora: LoraRef) -> Tensor<2> {
    let act = fused::swiglu(g.clone(), u.clone());
    let (Some((a, b, scale)), Base::F32(_) | Base::Bf16(_) | Base::Int8(_) | Base::QuantFp32(_)) =
        (lora, w)
    else {
        return proj(act, w, lora);
    };
    match fused::swiglu_matmul(act.clone(), g, u, a.clone()) {
        Some(low) => fused::lora_add(dense_product(act, w), low, b.clone().mul_scalar(scale)),
        None => proj(act, w, lora),
    }
}

/// A projection's LoRA term `(x @ A) @ (scale * B)`, its product not yet formed: it is added
/// into the base product's output as `gemm` forms it ([`fused::lora_add`]).
pub(crate) struct LoraTerm {
    /// `x @ A`, `[n, r]`.
    low: Tensor<2>,
    /// `scale * B`, `[r, out]`.
    sb: Tensor<2>,
}

impl LoraTerm {
    /// `base + low @ sb`.
    pub(crate) fn add_to(self, base: Tensor<2>) -> Tensor<2> {
        fused::lora_add(base, self.low, self.sb)
    }
}

/// The LoRA terms of [`proj_group`], `None` where a projection has no adapter; the `A` factors
/// are joined when every projection has one.
pub(crate) fn lora_group<const N: usize>(
    x: Tensor<2>,
    loras: [LoraRef; N],
) -> [Option<LoraTerm>; N] {
    lora_group_of(x, Source::Kept, loras)
}

/// `x @ a`, through [`fused::norm_matmul`] when `x` is a normed input.
fn a_product(x: &Tensor<2>, source: Source, a: Tensor<2>) -> Tensor<2> {
    if let Source::Normed { x: pre, w, eps } = source {
        if let Some(z) = fused::norm_matmul(x.clone(), pre.clone(), w.clone(), a.clone(), eps) {
            return z;
        }
    }
    x.clone().matmul(a)
}

fn lora_group_of<const N: usize>(
    x: Tensor<2>,
    source: Source,
    loras: [LoraRef; N],
) -> [Option<LoraTerm>; N] {
    let all_lora = loras.iter().all(Option::is_some);
    let xa = if all_lora && N > 1 {
        let a: Vec<Tensor<2>> = loras
            .iter()
            .map(|l| {
                l.map(|(a, _, _)| a.clone())
                    .expect("all_lora: every projection of the group has factors")
            })
            .collect();
        Some(a_product(&x, source, Tensor::cat(a, 1)))
    } else {
        None
    };
    let mut offset = 0;
    loras.map(|lora| {
        lora.map(|(a, b, scale)| {
            let r = a.dims()[1];
            let low = match &xa {
                Some(xa) => xa.clone().narrow(1, offset, r),
                None => a_product(&x, source, a.clone()),
            };
            offset += r;
            LoraTerm {
                low,
                sb: b.clone().mul_scalar(scale),
            }
        })
    })
}
