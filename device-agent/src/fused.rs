//! Operations with a hand-written backward pass on the flex CPU backend (plain and under
//! autodiff), written so that a LoRA step keeps only what its gradients need: softmax, SwiGLU,
//! causal attention, and the LoRA `A` products of a normed input and of SwiGLU's output. Values
//! come from the vectorised passes of [`crate::kernels`] and its fp32 products ([`kernels::flex_matmul`]).
//!
//! Built from burn's primitives, a block kept for the backward pass: the attention scores, the
//! probabilities and a second copy of them, keys and values copied out per query head, `silu(g)`
//! and its slope besides `u` and the SwiGLU product, and both normed inputs (about 63 MB per
//! block at batch 4 x 256 on SmolLM2-135M). Here:
//! - [`causal_attention`] keeps `q`, `k` and `v` (KV heads grouped in place, not copied) and
//!   recomputes the probabilities in the backward pass (one `q k^T` product per block);
//! - [`swiglu`] keeps `g` and `u`; [`swiglu_matmul`] and [`norm_matmul`] are the LoRA `A`
//!   products of SwiGLU's output and of RMSNorm's output, which recompute those outputs from what
//!   SwiGLU and RMSNorm keep anyway, so neither `[n, ffn]` product nor `[n, d]` normed copy is
//!   kept (the frozen products next to them keep only their weights);
//! - [`softmax`] keeps its output only.
//!
//! That is about 29 MB per block instead of 63 (`cost::train_memory_in` states the account;
//! BENCHMARKS.md, "Memory modes", the measured peaks). Other backends keep burn's operations:
//! the public functions choose, and those that have no plain-burn twin return `None` there.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, Flex};
use burn::tensor::activation;
use burn::tensor::{DType, Tensor, TensorData};

use crate::kernels::{self, contiguous_f32 as contiguous, f32_values as values};

/// The fused operations, for flex and autodiff over flex.
#[backend_extension(Flex, Autodiff)]
pub trait FusedBackend: Backend {
    /// Softmax over the last dimension.
    fn softmax_last(s: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `silu(g) * u`, element-wise on tensors of one shape.
    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `act a` where `act = silu(g) * u` (SwiGLU's output, passed in): the LoRA `A` product of
    /// the down projection, whose backward pass recomputes `act` from `g` and `u` instead of
    /// keeping it; see [`swiglu_matmul`].
    fn swiglu_matmul(
        act: FloatTensor<Self>,
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `h a` where `h = x / sqrt(mean(x^2) + eps) * w` (RMSNorm's output, passed in, `w` the
    /// frozen norm weight): a LoRA `A` product of a normed input, whose backward pass recomputes
    /// `h` from `x` instead of keeping it; see [`norm_matmul`].
    fn norm_matmul(
        h: FloatTensor<Self>,
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `y + low sb` (`y` `[n, out]` a base product's output, `low = x A` `[n, r]`, `sb` the
    /// scaled `B` `[r, out]`): the LoRA term added into `y` as it is formed; see [`lora_add`].
    fn lora_add(
        y: FloatTensor<Self>,
        low: FloatTensor<Self>,
        sb: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// RMSNorm of the rows of `x` with weight `w`; see [`rms_norm`].
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    /// Rotary position embedding of rows `[rows, heads * hd]` (whole sequences of `seq`
    /// positions from `start`) by the `[positions, hd]` angle tables `cos` and `sin`; see
    /// [`rope`].
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        hd: usize,
        seq: usize,
        start: usize,
    ) -> FloatTensor<Self>;
    /// Causal attention `softmax(q k^T / sqrt(hd) + mask) v` per KV head: `q` is `[batch,
    /// kv_heads, g * seq, hd]` (a group's queries as rows), `k` and `v` are `[batch, kv_heads,
    /// keys, hd]`; see [`causal_attention`].
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        seq: usize,
    ) -> FloatTensor<Self>;
}

/// A new flex tensor of `t`'s shape holding `v`.
fn like(t: &FlexTensor, v: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, t.layout().shape().clone()))
}

fn last_dim(t: &FlexTensor) -> usize {
    let shape = t.layout().shape();
    shape[shape.num_dims() - 1]
}

/// The shape of causal attention of queries `q` `[batch, kv_heads, group * seq, hd]` against
/// keys `k` `[batch, kv_heads, keys, hd]`, `seq` new positions, and the scores' scale.
fn attention_shape(q: &FlexTensor, k: &FlexTensor, seq: usize) -> (kernels::AttentionShape, f32) {
    let (qs, ks) = (q.layout().shape(), k.layout().shape());
    assert!(
        qs.num_dims() == 4
            && ks.num_dims() == 4
            && qs[0] == ks[0]
            && qs[1] == ks[1]
            && qs[3] == ks[3]
            && seq > 0
            && qs[2] % seq == 0
            && ks[2] >= seq,
        "causal attention of queries {qs:?} against keys {ks:?}, {seq} new positions"
    );
    let shape = kernels::AttentionShape {
        batch: qs[0],
        kv_heads: qs[1],
        group: qs[2] / seq,
        seq,
        keys: ks[2],
        head_dim: qs[3],
    };
    (shape, 1.0 / (qs[3] as f32).sqrt())
}

/// RMSNorm of the rows of `x` (flex) with weight `w`.
fn rms_norm_flex(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
    let (x, w) = (contiguous(x), contiguous(w));
    let mut out = vec![0f32; values(&x).len()];
    assert_eq!(
        last_dim(&x),
        values(&w).len(),
        "RMSNorm weight against rows"
    );
    kernels::rms_norm_into(values(&x), values(&w), &mut out, eps as f32);
    like(&x, out)
}

/// [`kernels::rope_into`] on flex tensors: `x` `[rows, heads * hd]`, the tables `[positions,
/// hd]`; the angles negated when `inverse` (the backward pass).
fn rope_flex(
    x: FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    (hd, seq, start): (usize, usize, usize),
    inverse: bool,
) -> FlexTensor {
    let (x, cos, sin) = (
        contiguous(x),
        contiguous(cos.clone()),
        contiguous(sin.clone()),
    );
    let mut out = vec![0f32; values(&x).len()];
    let at = kernels::RopeRows {
        cos: values(&cos),
        sin: values(&sin),
        hd,
        seq,
        start,
    };
    kernels::rope_into(values(&x), &mut out, last_dim(&x), at, inverse);
    like(&x, out)
}

impl FusedBackend for Flex {
    fn rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> FlexTensor {
        rms_norm_flex(x, w, eps)
    }

    fn rope(
        x: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        hd: usize,
        seq: usize,
        start: usize,
    ) -> FlexTensor {
        rope_flex(x, &cos, &sin, (hd, seq, start), false)
    }

    fn norm_matmul(
        h: FlexTensor,
        _x: FlexTensor,
        _w: FlexTensor,
        a: FlexTensor,
        _eps: f64,
    ) -> FlexTensor {
        kernels::flex_matmul(h, a)
    }

    fn swiglu_matmul(act: FlexTensor, _g: FlexTensor, _u: FlexTensor, a: FlexTensor) -> FlexTensor {
        kernels::flex_matmul(act, a)
    }

    fn lora_add(y: FlexTensor, low: FlexTensor, sb: FlexTensor) -> FlexTensor {
        kernels::flex_matmul_add(y, low, sb)
    }

    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, seq: usize) -> FlexTensor {
        let (shape, scale) = attention_shape(&q, &k, seq);
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let out = kernels::causal_attention(values(&q), values(&k), values(&v), shape, scale);
        like(&q, out)
    }

    fn softmax_last(s: FlexTensor) -> FlexTensor {
        let s = contiguous(s);
        let mut out = vec![0f32; values(&s).len()];
        kernels::softmax_into(values(&s), &mut out, last_dim(&s));
        like(&s, out)
    }

    fn swiglu(g: FlexTensor, u: FlexTensor) -> FlexTensor {
        let (g, u) = (contiguous(g), contiguous(u));
        assert_eq!(
            g.layout().shape(),
            u.layout().shape(),
            "swiglu of two shapes"
        );
        let mut out = vec![0f32; values(&g).len()];
        kernels::swiglu_into(values(&g), values(&u), &mut out);
        like(&g, out)
    }
}

/// `ds = P * (dy - sum(dy * P))` from the kept output `P`.
#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        if let Some(node) = parent {
            let p = ops.state;
            let mut ds = vec![0f32; values(&p).len()];
            kernels::softmax_grad_into(values(&p), values(&dy), &mut ds, last_dim(&p), 1.0);
            grads.register::<Flex>(node.id, like(&p, ds));
        }
    }
}

/// RMSNorm's gradients from the kept input and weight: `dx` by [`kernels::rms_norm_grad_into`],
/// and `dw = sum over rows of dy x r` when the weight is tracked (a frozen model's is not).
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, w, eps) = ops.state;
        let (xv, wv, dyv) = (values(&x), values(&w), values(&dy));
        if let Some(node) = node_x {
            let mut dx = vec![0f32; xv.len()];
            kernels::rms_norm_grad_into(xv, wv, dyv, &mut dx, eps as f32);
            grads.register::<Flex>(node.id, like(&x, dx));
        }
        if let Some(node) = node_w {
            let d = wv.len();
            let mut dw = vec![0f32; d];
            for (xr, er) in xv.chunks_exact(d).zip(dyv.chunks_exact(d)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps as f32).sqrt();
                for ((g, &v), &e) in dw.iter_mut().zip(xr).zip(er) {
                    *g += e * v * r;
                }
            }
            grads.register::<Flex>(node.id, like(&w, dw));
        }
    }
}

/// `dx` is `dy` rotated back (the rotation is orthogonal), from the kept tables.
#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor, (usize, usize, usize));

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = parent {
            let (cos, sin, at) = ops.state;
            grads.register::<Flex>(node.id, rope_flex(dy, &cos, &sin, at, true));
        }
    }
}

/// `dg = dy * u * silu'(g)`, `du = dy * silu(g)` from the kept inputs.
#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (g, u) = ops.state;
        let n = values(&g).len();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        kernels::swiglu_grad_into(values(&g), values(&u), values(&dy), &mut dg, &mut du);
        if let Some(node) = node_g {
            grads.register::<Flex>(node.id, like(&g, dg));
        }
        if let Some(node) = node_u {
            grads.register::<Flex>(node.id, like(&u, du));
        }
    }
}

/// How a recomputing product rebuilds its input `x` in the backward pass, from tensors that
/// `x`'s producer keeps anyway (so no new memory stays).
#[derive(Debug, Clone)]
enum Recipe {
    /// `x = silu(g) * u`.
    Swiglu { g: FlexTensor, u: FlexTensor },
    /// `x = rms_norm(pre) * w`.
    Norm {
        pre: FlexTensor,
        w: FlexTensor,
        eps: f64,
    },
}

impl Recipe {
    fn input(self) -> FlexTensor {
        match self {
            Recipe::Swiglu { g, u } => Flex::swiglu(g, u),
            Recipe::Norm { pre, w, eps } => rms_norm_flex(pre, w, eps),
        }
    }
}

/// `z = x a` with `x` rebuilt by its [`Recipe`]: `da = x^T dz`, `dx = dz a^T` (summed at `x`
/// with the frozen product's gradient, then through `x`'s own backward once).
#[derive(Debug)]
struct RecomputingProduct;

impl Backward<Flex, 2> for RecomputingProduct {
    type State = (Recipe, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a] = ops.parents;
        let dz = grads.consume::<Flex>(&ops.node);
        let (recipe, a) = ops.state;
        if let Some(node) = node_a {
            let x = contiguous(recipe.input());
            let da = match kernels::lora_grad::flex_grads(&x, &dz, None) {
                Some((_, da)) => da,
                None => kernels::flex_matmul(Flex::float_swap_dims(x, 0, 1), dz.clone()),
            };
            grads.register::<Flex>(node.id, da);
        }
        if let Some(node) = node_x {
            let dx = kernels::flex_matmul(dz, Flex::float_swap_dims(a, 0, 1));
            grads.register::<Flex>(node.id, dx);
        }
    }
}

/// `x a` under autodiff, keeping `a` and the recipe of `x` instead of `x`.
fn recomputing_product<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    a: FloatTensor<Autodiff<Flex, C>>,
    recipe: impl FnOnce() -> Recipe,
) -> FloatTensor<Autodiff<Flex, C>> {
    match RecomputingProduct
        .prepare::<C>([x.node(), a.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let a = a.into_primitive();
            let z = kernels::flex_matmul(x.into_primitive(), a.clone());
            prep.finish((recipe(), a), z)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(kernels::flex_matmul(x.into_primitive(), a.into_primitive()))
        }
    }
}

/// `y + low sb`: `dy` passes to `y` unchanged, `dlow = dy sb^T`, `dsb = low^T dy`.
#[derive(Debug)]
struct LoraAddBackward;

impl Backward<Flex, 3> for LoraAddBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_y, node_low, node_sb] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (low, sb) = ops.state;
        let both = node_low.is_some() && node_sb.is_some();
        let dy = if both { contiguous(dy) } else { dy };
        if let Some((Some(dlow), dsb)) = both
            .then(|| kernels::lora_grad::flex_grads(&dy, &low, Some(&sb)))
            .flatten()
        {
            for (node, g) in [(node_low, dlow), (node_sb, dsb)] {
                grads.register::<Flex>(node.expect("both tracked").id, g);
            }
            if let Some(node) = node_y {
                grads.register::<Flex>(node.id, dy);
            }
            return;
        }
        if let Some(node) = node_low {
            let dlow = kernels::flex_matmul(dy.clone(), Flex::float_swap_dims(sb, 0, 1));
            grads.register::<Flex>(node.id, dlow);
        }
        if let Some(node) = node_sb {
            let dsb = kernels::flex_matmul(Flex::float_swap_dims(low, 0, 1), dy.clone());
            grads.register::<Flex>(node.id, dsb);
        }
        if let Some(node) = node_y {
            grads.register::<Flex>(node.id, dy);
        }
    }
}

/// Attention's gradients from the kept `q`, `k` and `v`, the probabilities recomputed block by
/// block ([`kernels::causal_attention_backward`]).
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (q, k, v, seq) = ops.state;
        let (shape, scale) = attention_shape(&q, &k, seq);
        let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
        let (dq, dk, dv) = kernels::causal_attention_backward(
            values(&q),
            values(&k),
            values(&v),
            values(&dy),
            shape,
            scale,
        );
        for (node, t, g) in [(node_q, &q, dq), (node_k, &k, dk), (node_v, &v, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, like(t, g));
            }
        }
    }
}

impl<C: CheckpointStrategy> FusedBackend for Autodiff<Flex, C> {
    fn norm_matmul(
        h: FloatTensor<Self>,
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        recomputing_product::<C>(h, a, || Recipe::Norm {
            pre: x.into_primitive(),
            w: w.into_primitive(),
            eps,
        })
    }

    fn swiglu_matmul(
        act: FloatTensor<Self>,
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        recomputing_product::<C>(act, a, || Recipe::Swiglu {
            g: contiguous(g.into_primitive()),
            u: contiguous(u.into_primitive()),
        })
    }

    fn lora_add(
        y: FloatTensor<Self>,
        low: FloatTensor<Self>,
        sb: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match LoraAddBackward
            .prepare::<C>([y.node(), low.node(), sb.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (low, sb) = (low.into_primitive(), sb.into_primitive());
                let out = Flex::lora_add(y.into_primitive(), low.clone(), sb.clone());
                prep.finish((low, sb), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::lora_add(
                y.into_primitive(),
                low.into_primitive(),
                sb.into_primitive(),
            )),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        seq: usize,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let o = Flex::causal_attention(q.clone(), k.clone(), v.clone(), seq);
                prep.finish((q, k, v, seq), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::causal_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                seq,
            )),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (
                    contiguous(x.into_primitive()),
                    contiguous(w.into_primitive()),
                );
                let y = rms_norm_flex(x.clone(), w.clone(), eps);
                prep.finish((x, w, eps), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(rms_norm_flex(x.into_primitive(), w.into_primitive(), eps))
            }
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        hd: usize,
        seq: usize,
        start: usize,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::rope(x.into_primitive(), cos.clone(), sin.clone(), hd, seq, start);
                prep.finish((cos, sin, (hd, seq, start)), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::rope(x.into_primitive(), cos, sin, hd, seq, start))
            }
        }
    }

    fn softmax_last(s: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxBackward
            .prepare::<C>([s.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = Flex::softmax_last(s.into_primitive());
                prep.finish(p.clone(), p)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::softmax_last(s.into_primitive())),
        }
    }

    fn swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward
            .prepare::<C>([g.node(), u.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (g, u) = (
                    contiguous(g.into_primitive()),
                    contiguous(u.into_primitive()),
                );
                let y = Flex::swiglu(g.clone(), u.clone());
                prep.finish((g, u), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::swiglu(g.into_primitive(), u.into_primitive()))
            }
        }
    }
}

/// Whether `t` can take the fused path: f32 on flex.
fn on_flex<const D: usize>(t: &Tensor<D>) -> bool {
    t.dtype() == DType::F32 && crate::backend::is_flex(&t.device())
}

/// Softmax over the last dimension: the fused operation on flex, burn's elsewhere.
pub fn softmax<const D: usize>(s: Tensor<D>) -> Tensor<D> {
    if !on_flex(&s) {
        return activation::softmax(s, D - 1);
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::softmax_last(s.into_dispatch()))
}

/// RMSNorm of the rows of `x` `[n, d]` with weight `w` `[d]`, `x / sqrt(mean(x^2) + eps) * w`,
/// in one pass ([`kernels::rms_norm_into`]); under autodiff it keeps `x` and `w` (`x` is the
/// residual stream, kept anyway) and its backward pass is one more pass per row. `None` off
/// flex.
pub fn rms_norm(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Option<Tensor<2>> {
    if !on_flex(&x) || !on_flex(w) {
        return None;
    }
    let d = w.dims()[0];
    let w2 = w.clone().reshape([1, d]);
    let y = <Dispatch as FusedBackend>::rms_norm(x.into_dispatch(), w2.into_dispatch(), eps);
    Some(Tensor::from_dispatch(y))
}

/// Rotary position embedding of `x` `[batch * seq, heads * hd]` (the rows a q or k product
/// leaves, heads not yet split) at positions `start..start + seq` of each sequence, by `cos`
/// and `sin` `[positions, hd]` ([`crate::model::Rope`]'s tables), in one pass over the rows
/// ([`kernels::rope_into`]); its backward pass rotates the gradient back. The same bits as
/// [`crate::model::Rope::apply`]'s operations. `None` off flex.
pub fn rope(
    x: Tensor<2>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    hd: usize,
    seq: usize,
    start: usize,
) -> Option<Tensor<2>> {
    if !on_flex(&x) || !on_flex(cos) {
        return None;
    }
    Some(Tensor::from_dispatch(<Dispatch as FusedBackend>::rope(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        hd,
        seq,
        start,
    )))
}

/// Causal attention on flex (see [`crate::model::causal_attention`], which reshapes into this
/// layout and serves other backends): `q` `[batch, kv_heads, g * seq, hd]` unscaled, `k` and `v`
/// `[batch, kv_heads, keys, hd]`, the queries at the last `seq` key positions. `None` off flex.
/// Under autodiff it keeps `q`, `k` and `v` and no `seq x keys` tensor: the backward pass
/// recomputes the probabilities.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, seq: usize) -> Option<Tensor<4>> {
    if !on_flex(&q) {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::causal_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            seq,
        ),
    ))
}

/// `y + low sb`, a LoRA term `(x A)(scale B)` added into the base product `y`: on flex the
/// product is added into `y`'s buffer as `gemm` forms it, so no `[n, out]` LoRA product is
/// allocated and no separate add runs; its backward is the product's (`dlow = dy sb^T`, `dsb =
/// low^T dy`, `dy` to `y`). Burn's `y + low.matmul(sb)` off flex.
pub fn lora_add(y: Tensor<2>, low: Tensor<2>, sb: Tensor<2>) -> Tensor<2> {
    if !on_flex(&y) {
        return y + low.matmul(sb);
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::lora_add(
        y.into_dispatch(),
        low.into_dispatch(),
        sb.into_dispatch(),
    ))
}

/// `act a` for SwiGLU's output `act = silu(g) * u` (as [`swiglu`] returned it for these `g` and
/// `u`): on flex under autodiff the backward pass recomputes `act` from `g` and `u`, which
/// SwiGLU keeps anyway, so the `[n, ffn]` product is not kept for the LoRA `A` gradient. `None`
/// off flex.
pub fn swiglu_matmul(
    act: Tensor<2>,
    g: Tensor<2>,
    u: Tensor<2>,
    a: Tensor<2>,
) -> Option<Tensor<2>> {
    if !on_flex(&act) {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::swiglu_matmul(
            act.into_dispatch(),
            g.into_dispatch(),
            u.into_dispatch(),
            a.into_dispatch(),
        ),
    ))
}

/// `h a` for RMSNorm's output `h = x / sqrt(mean(x^2) + eps) * w` (as
/// [`crate::model::rms_norm`] returned it for these `x`, `w` and `eps`): on flex under autodiff
/// the backward pass recomputes `h` from `x`, which RMSNorm keeps anyway, so `h` is not kept for
/// the LoRA `A` gradient. `None` off flex.
pub fn norm_matmul(
    h: Tensor<2>,
    x: Tensor<2>,
    w: Tensor<1>,
    a: Tensor<2>,
    eps: f64,
) -> Option<Tensor<2>> {
    if !on_flex(&h) {
        return None;
    }
    Some(Tensor::from_dispatch(
        <Dispatch as FusedBackend>::norm_matmul(
            h.into_dispatch(),
            x.into_dispatch(),
            w.into_dispatch(),
            a.into_dispatch(),
            eps,
        ),
    ))
}

/// `silu(g) * u`: the fused operation on flex, burn's elsewhere.
pub fn swiglu<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Tensor<D> {
    if !on_flex(&g) {
        return activation::silu(g) * u;
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::swiglu(
        g.into_dispatch(),
        u.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests;
