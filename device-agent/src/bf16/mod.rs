//! bf16 matrix products for the frozen base (`--precision bf16`): the projections' and the tied
//! LM head's products, forward and input gradient, round their operands to bf16 and accumulate
//! in fp32 on the CPU's bf16 instructions ([`gemm`]: AMX tiles where the CPU has them and the
//! kernel permits them, [`amx`], else AVX-512-BF16 dot products); the LoRA factors, their
//! gradients, the optimiser and the loss stay fp32, and the weights themselves stay fp32 in
//! memory (pruning, scoring and export read them), rounded per product.
//!
//! [`Precision`] names the frozen base's arithmetic, this module's bf16 and also fp32 and the int8
//! products of [`crate::quant::rowwise`], which share the product below and its kept packings.
//!
//! The product is a burn backend extension ([`FrozenBackend`]) with a hand-written backward: for
//! `y = x w` with `w` frozen, `dx = dy w^T`, the same kernel on the other layout. It exists for
//! the flex backend on a CPU with AVX-512-BF16; [`Precision::resolve`] turns a request for bf16
//! anywhere else into fp32 and says why, once, before any work starts.

pub mod amx;
pub mod cache;
pub mod gemm;

use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};

use gemm::{Layout, PackedB};

/// Errors of the precision setting.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error("unknown precision '{0}' (fp32, bf16, int8, auto)")]
    Unknown(String),
}

/// The arithmetic of the frozen base's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    /// Int8 operands with one scale per row ([`crate::quant::rowwise`]): the activations' and
    /// gradients' rows quantized per product, their largest columns kept in fp32, the weight
    /// kept quantized both ways. Asked for by name only: `auto` does not pick it, since its
    /// losses stray from fp32's by up to about 0.06 nats a step over 40 steps, ten times bf16's
    /// (no bias seen in four runs; BENCHMARKS.md, "Int8 products with outlier columns").
    Int8,
}

impl Precision {
    /// The name a flag or config takes: `fp32`, `bf16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, PrecisionError> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            _ => Err(PrecisionError::Unknown(s.to_string())),
        }
    }
}

impl Precision {
    /// The precision a flag or config value asks for on this backend and CPU: `fp32`, `bf16`,
    /// `int8`, or `auto`, which is bf16 where this backend and CPU have bf16 products (the
    /// frozen-base accuracy tests hold them to fp32 within bf16's tolerance) and fp32 elsewhere:
    /// int8's losses stray further from fp32's (see [`Precision::Int8`]).
    pub fn requested(name: &str, flex: bool) -> Result<Precision, PrecisionError> {
        if name.eq_ignore_ascii_case("auto") {
            let bf16 = flex && gemm::available();
            return Ok(if bf16 {
                Precision::Bf16
            } else {
                Precision::Fp32
            });
        }
        name.parse()
    }

    /// The precision that will run for this request on this backend and CPU, and, when it is
    /// not the one asked for, why.
    pub fn resolve(self, flex: bool) -> (Precision, Option<&'static str>) {
        match self {
            Precision::Fp32 => (Precision::Fp32, None),
            Precision::Bf16 if !flex => (
                Precision::Fp32,
                Some("bf16 products are built for the flex CPU backend only; running fp32"),
            ),
            Precision::Bf16 if !gemm::available() => (
                Precision::Fp32,
                Some("no AVX-512-BF16 (bf16 dot products) on this CPU, or FEDSPINE_ISA caps our kernels below AVX-512; running fp32"),
            ),
            Precision::Bf16 => (Precision::Bf16, None),
            Precision::Int8 if !flex => (
                Precision::Fp32,
                Some("int8 products are built for the flex CPU backend only; running fp32"),
            ),
            // Every CPU runs them: VNNI, AVX2 or the portable loop.
            Precision::Int8 => (Precision::Int8, None),
        }
    }
}

/// A frozen-weight product: `x w` (`transposed` false, `w` is `[k, n]`) or `x w^T` (`transposed`
/// true, `w` is `[n, k]`); `x` is `[m, k]`, gradients flow to `x` only. In `arithmetic`
/// [`Precision::Bf16`] the operands are rounded ([`gemm`]); in [`Precision::Int8`] they are
/// quantized row by row ([`crate::quant::rowwise`]); in fp32 it is the product of
/// [`crate::kernels::sgemm`], which reads a held weight in place (AVX2 and AVX-512), or else of
/// [`crate::kernels::flex_matmul`], which writes its output once where flex's own matmul zeroes
/// and copies it, in the forward pass and in the input gradient alike.
#[backend_extension(Flex, Autodiff)]
pub trait FrozenBackend: Backend {
    fn frozen_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        transposed: bool,
        arithmetic: Precision,
    ) -> FloatTensor<Self>;
}

/// A flex tensor's f32 values in row-major order and its two dimensions.
fn rows_of(t: &FlexTensor) -> (FlexTensor, [usize; 2]) {
    assert_eq!(t.dtype(), DType::F32, "bf16 products take f32 tensors");
    let shape = t.layout().shape();
    assert_eq!(shape.num_dims(), 2, "bf16 products take matrices");
    let dims = [shape[0], shape[1]];
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.to_contiguous()
    };
    (t, dims)
}

/// A frozen product's operands in row-major order: `x` `[m, k]` and the weight `[wr, wc]`, read
/// in `layout` (Transposed: as `[n][k]`), for an `[m, n]` output.
struct Operands {
    x: FlexTensor,
    w: FlexTensor,
    m: usize,
    wr: usize,
    wc: usize,
    n: usize,
    layout: Layout,
}

impl Operands {
    fn new(x: &FlexTensor, w: &FlexTensor, transposed: bool) -> Operands {
        let (x, [m, k]) = rows_of(x);
        let (w, [wr, wc]) = rows_of(w);
        let layout = if transposed {
            Layout::Transposed
        } else {
            Layout::Plain
        };
        let (wk, n) = layout.reduced_and_out(wr, wc);
        assert_eq!(k, wk, "product of [{m}, {k}] with a weight of [{wr}, {wc}]");
        Operands {
            x,
            w,
            m,
            wr,
            wc,
            n,
            layout,
        }
    }

    fn x(&self) -> &[f32] {
        self.x.as_slice::<f32>().expect("contiguous f32")
    }

    fn w(&self) -> &[f32] {
        self.w.as_slice::<f32>().expect("contiguous f32")
    }

    fn output(&self, values: Vec<f32>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, [self.m, self.n]))
    }
}

/// The fp32 product with the weight read where it lies ([`crate::kernels::sgemm`]: no copy of
/// the weight per product), when the CPU has those kernels, `x` has fewer rows than
/// [`crate::kernels::sgemm::IN_PLACE_BELOW_ROWS`] and `w` is a held matrix (a model's own weight
/// is); `None` otherwise, for the `gemm` crate's product.
fn fp32_in_place(x: &FlexTensor, w: &FlexTensor, transposed: bool) -> Option<FlexTensor> {
    let matrix = |t: &FlexTensor| t.dtype() == DType::F32 && t.layout().shape().num_dims() == 2;
    // Checked before the operands are made row-major: without the kernels nothing is copied.
    if !(matrix(x) && matrix(w) && w.is_contiguous())
        || crate::kernels::sgemm::in_place_below_rows()
            .is_none_or(|rows| x.layout().shape()[0] >= rows)
    {
        return None;
    }
    let o = Operands::new(x, w, transposed);
    let out = crate::kernels::sgemm::product(o.x(), o.m, o.w(), o.wr, o.wc, o.layout)?;
    Some(o.output(out))
}

/// The int8 product ([`crate::quant::rowwise`]): `x`'s rows quantized for this product, its
/// largest columns kept in fp32 ([`rowwise::product_with_outliers`]: in the forward they meet
/// rows of the fp32 weight; in the input gradient, rows of the weight's other int8 form, since
/// the fp32 ones lie a row apart), the weight's rows along the reduced dimension (its columns
/// for `x w`, its rows for `x w^T`) quantized once and kept when `keep` (a held matrix: the
/// model's own buffer).
fn int8_product(o: &Operands, keep: bool) -> FlexTensor {
    use crate::quant::rowwise::{self, RowQuant};
    let (wr, wc, n) = (o.wr, o.wc, o.n);
    // The weight quantized along its rows (Transposed) or its columns (Plain): the forward's
    // and the input gradient's right operands, each the other's way to a column of weights.
    let form = |layout: Layout| {
        let make = || match layout {
            Layout::Plain => RowQuant::quantize_columns(o.w(), wr, wc),
            Layout::Transposed => RowQuant::quantize(o.w(), wr, wc),
        };
        if keep {
            cache::kept(&o.w, o.w(), wr, wc, layout, make)
        } else {
            Arc::new(make())
        }
    };
    let b = form(o.layout);
    let k = b.k();
    let w = o.w();
    let weights = |cols: &[usize]| -> Vec<f32> {
        match o.layout {
            // `x w`, `w` `[k, n]`: a column's weights are a row of `w`, read as they lie.
            Layout::Plain => cols
                .iter()
                .flat_map(|&c| &w[c * n..(c + 1) * n])
                .copied()
                .collect(),
            // `x w^T`, `w` `[n, k]`: a column's weights are a column of `w`, spread over all of
            // it; a held weight's other int8 form has them as a row (a byte each, together).
            Layout::Transposed if keep => form(Layout::Plain).dequantize_rows(cols),
            Layout::Transposed => cols
                .iter()
                .flat_map(|&c| (0..n).map(move |j| w[j * k + c]))
                .collect(),
        }
    };
    o.output(rowwise::product_with_outliers(
        crate::cpu::DotPath::detect(),
        o.x(),
        o.m,
        &b,
        weights,
    ))
}

impl FrozenBackend for Flex {
    fn frozen_matmul(
        x: FlexTensor,
        w: FlexTensor,
        transposed: bool,
        arithmetic: Precision,
    ) -> FlexTensor {
        if arithmetic == Precision::Int8 {
            let keep = w.is_contiguous();
            return int8_product(&Operands::new(&x, &w, transposed), keep);
        }
        if arithmetic == Precision::Fp32 {
            if let Some(out) = fp32_in_place(&x, &w, transposed) {
                return out;
            }
            let w = if transposed {
                Flex::float_swap_dims(w, 0, 1)
            } else {
                w
            };
            return crate::kernels::flex_matmul(x, w);
        }
        // A weight held contiguously is the model's own buffer, packed once and kept; a
        // contiguous copy made here would die with this product, so it is packed for it alone.
        let keep = w.is_contiguous();
        let o = Operands::new(&x, &w, transposed);
        let out = if keep {
            gemm::product_packed(
                o.x(),
                o.m,
                &cache::packed(&o.w, o.w(), o.wr, o.wc, o.layout),
            )
        } else {
            gemm::product(o.x(), o.m, o.w(), o.wr, o.wc, o.layout)
        };
        o.output(out)
    }
}

impl<B: Backend + FrozenBackend, C: CheckpointStrategy> FrozenBackend for Autodiff<B, C> {
    fn frozen_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        transposed: bool,
        arithmetic: Precision,
    ) -> FloatTensor<Self> {
        /// `dx = dy w^T` for `y = x w` (and `dy w` for `y = x w^T`); no gradient for `w`.
        #[derive(Debug)]
        struct FrozenProduct {
            transposed: bool,
            arithmetic: Precision,
        }

        impl<B: Backend + FrozenBackend> Backward<B, 2> for FrozenProduct {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, _node_w] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = node_x {
                    let dx = B::frozen_matmul(grad, ops.state, !self.transposed, self.arithmetic);
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        match (FrozenProduct {
            transposed,
            arithmetic,
        })
        .prepare::<C>([x.node(), w.node()])
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => {
                let w = w.into_primitive();
                let out = B::frozen_matmul(x.into_primitive(), w.clone(), transposed, arithmetic);
                prep.finish(w, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(
                x.into_primitive(),
                w.into_primitive(),
                transposed,
                arithmetic,
            )),
        }
    }
}

/// The tied LM head `[vocab, d]` rounded and packed for the training loss's row chunks
/// ([`crate::train::loss`]): logits `x h^T` and input gradients `g h`, both with bf16 operands.
/// The loss works outside the autodiff graph, on untracked flex tensors. The head is 28M values
/// and the loss takes it in chunks of 128 rows, twice each: it is packed once and kept across
/// losses ([`cache`]), not per chunk or per step.
pub struct PackedHead {
    /// `h` read as `[vocab][d]` for `x h^T`.
    logits: Arc<PackedB>,
    /// `h` read as `[k = vocab][n = d]` for `g h`, when packed for training.
    grads: Option<Arc<PackedB>>,
    vocab: usize,
    d: usize,
}

impl PackedHead {
    /// `None` unless `head` is an untracked flex f32 matrix; `gradients` packs the second
    /// layout, for [`PackedHead::input_grad`] (scoring needs only the logits).
    pub fn new(head: &Tensor<2>, gradients: bool) -> Option<PackedHead> {
        let ft = crate::kernels::flex_f32(head)?;
        let [vocab, d] = head.dims();
        let h = crate::kernels::slice(&ft);
        // The head (a tied model's embedding) is the same weight step after step: kept packed.
        Some(PackedHead {
            logits: cache::packed(&ft, h, vocab, d, Layout::Transposed),
            grads: gradients.then(|| cache::packed(&ft, h, vocab, d, Layout::Plain)),
            vocab,
            d,
        })
    }

    /// Logits `x h^T` (`x` `[m, d]`, untracked flex f32), `None` otherwise.
    pub fn logits(&self, x: &Tensor<2>) -> Option<Tensor<2>> {
        self.product(x, self.d, &self.logits, self.vocab)
    }

    /// The loss's gradient with respect to the hidden rows, `g h` (`g` `[m, vocab]`); `None`
    /// when packed without gradients.
    pub fn input_grad(&self, g: &Tensor<2>) -> Option<Tensor<2>> {
        self.product(g, self.vocab, self.grads.as_ref()?, self.d)
    }

    fn product(&self, x: &Tensor<2>, k: usize, b: &PackedB, n: usize) -> Option<Tensor<2>> {
        let [m, xk] = x.dims();
        if xk != k {
            return None;
        }
        let ft = crate::kernels::flex_f32(x)?;
        let mut out = vec![0f32; m * n];
        gemm::matmul(crate::kernels::slice(&ft), m, b, &mut out);
        Some(crate::kernels::wrap(out, [m, n]))
    }
}

/// `x w` with bf16 operands (`w` `[k, n]`, frozen: it must not be tracked).
pub fn matmul(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    product(x, w, false, Precision::Bf16)
}

/// `x w^T` with bf16 operands (`w` `[n, k]`, frozen).
pub fn matmul_transposed(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    product(x, w, true, Precision::Bf16)
}

/// `x w` with int8 operands and row-wise scales (`w` `[k, n]`, frozen; see [`Precision::Int8`]),
/// on the flex backend; `None` off flex or for another dtype.
pub fn matmul_int8(x: Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let flex = |t: &Tensor<2>| t.dtype() == DType::F32 && crate::backend::is_flex(&t.device());
    (flex(&x) && flex(w)).then(|| product(x, w, false, Precision::Int8))
}

/// `x w` in fp32 for a frozen `w` (`[k, n]`, untracked) on the flex backend: burn's product and
/// gradient without flex's zeroing and copying of each output (see [`FrozenBackend`]). `None` off
/// flex or for another dtype.
pub fn matmul_fp32(x: Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let flex = |t: &Tensor<2>| t.dtype() == DType::F32 && crate::backend::is_flex(&t.device());
    (flex(&x) && flex(w)).then(|| product(x, w, false, Precision::Fp32))
}

fn product(x: Tensor<2>, w: &Tensor<2>, transposed: bool, arithmetic: Precision) -> Tensor<2> {
    debug_assert!(
        !w.is_tracked(),
        "frozen products give no gradient to the weight"
    );
    Tensor::from_dispatch(<Dispatch as FrozenBackend>::frozen_matmul(
        x.into_dispatch(),
        w.clone().into_dispatch(),
        transposed,
        arithmetic,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn auto_asks_for_bf16_only_where_the_cpu_has_it() {
        let here = if gemm::available() {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        assert_eq!(Precision::requested("auto", true).unwrap(), here);
        assert_eq!(Precision::requested("AUTO", true).unwrap(), here);
        // Off flex there are no bf16 products to ask for.
        assert_eq!(
            Precision::requested("auto", false).unwrap(),
            Precision::Fp32
        );
        assert_eq!(Precision::requested("bf16", true).unwrap(), Precision::Bf16);
        assert_eq!(Precision::requested("int8", true).unwrap(), Precision::Int8);
        assert_eq!(Precision::Int8.resolve(true), (Precision::Int8, None));
        assert_eq!(Precision::Int8.resolve(false).0, Precision::Fp32);
        assert_ne!(Precision::requested("auto", true).unwrap(), Precision::Int8);
        assert_eq!(Precision::requested("fp32", true).unwrap(), Precision::Fp32);
        let e = Precision::requested("fp8", true).unwrap_err().to_string();
        assert!(e.contains("'fp8'") && e.contains("auto"), "{e}");
        // What `auto` asks for runs as asked: resolving it never falls back.
        assert_eq!(here.resolve(true), (here, None));
    }

    fn random(dims: [usize; 2], seed: u64, device: &Device) -> Tensor<2> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..dims[0] * dims[1])
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(v, dims), device)
    }

    fn max_rel(a: Tensor<2>, b: Tensor<2>) -> f32 {
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Where the CPU has the instructions: the product and the input gradient of `sum(y * g)`
    /// through both layouts agree with fp32 within bf16 rounding (8 significant bits: about
    /// 2^-8 relative per operand, far less on a sum of 96 terms of mixed sign), and the weight
    /// gets no gradient. Elsewhere, asking for bf16 resolves to fp32 with a reason.
    /// A weight's packing is kept: the product through the cache is the per-call product bit for
    /// bit, again on the second call. A weight changed after it was packed is never served its
    /// old packing: the cache shares the buffer, so flex copies it before changing it (were the
    /// buffer changed in place, the cache would hand back the old values at the same address).
    #[test]
    fn kept_packing_follows_the_weight() {
        if !gemm::available() {
            return;
        }
        let device = Device::flex();
        let (m, k, n) = (5, 64, 48);
        let x = random([m, k], 4, &device);
        let w = random([k, n], 5, &device);
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let xs = values(x.clone());
        let per_call = gemm::product(&xs, m, &values(w.clone()), k, n, Layout::Plain);
        for _ in 0..2 {
            assert_eq!(values(matmul(x.clone(), &w)), per_call);
        }
        let changed = w.add_scalar(1.0);
        let y = matmul(x.clone(), &changed);
        let exact = x.matmul(changed);
        assert!(max_rel(y, exact) < 1e-2, "served a stale packing");
    }

    #[test]
    fn product_and_input_gradient_match_fp32_within_rounding() {
        let (p, why) = Precision::Bf16.resolve(true);
        if !gemm::available() {
            assert_eq!(p, Precision::Fp32);
            assert!(why.unwrap().contains("AVX-512-BF16"));
            return;
        }
        assert_eq!((p, why), (Precision::Bf16, None));
        let device = Device::flex().autodiff();
        let (m, k, n) = (37, 96, 70);
        let w = random([k, n], 2, &device);
        let g = random([m, n], 3, &device);
        for transposed in [false, true] {
            let x = random([m, k], 1, &device).require_grad();
            let w = if transposed {
                w.clone().transpose()
            } else {
                w.clone()
            };
            let y16 = product(x.clone(), &w, transposed, Precision::Bf16);
            let wt = if transposed {
                w.clone().transpose()
            } else {
                w.clone()
            };
            let y32 = x.clone().matmul(wt);
            let err = max_rel(y16.clone().inner(), y32.clone().inner());
            // Not fp32 under another name: rounding shows, within its bound.
            assert!(err > 1e-6 && err < 1e-2, "transposed {transposed}: {err}");
            let d16 = x.grad(&(y16 * g.clone()).sum().backward()).unwrap();
            let d32 = x.grad(&(y32 * g.clone()).sum().backward()).unwrap();
            assert!(max_rel(d16, d32) < 1e-2, "transposed {transposed}");
        }
        // A wrong backend resolves to fp32 with its reason.
        let (p, why) = Precision::Bf16.resolve(false);
        assert_eq!(p, Precision::Fp32);
        assert!(why.unwrap().contains("flex"));
    }
}
