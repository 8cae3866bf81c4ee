//! Softmax and SwiGLU as single operations with a hand-written backward, on the flex CPU
//! backend (plain and under autodiff): the value comes from one vectorised pass of
//! [`crate::kernels`], and the autodiff graph keeps only what the gradient needs.
//!
//! Built from burn's primitives, attention's softmax under autodiff kept the scores, the
//! probabilities and a second copy of the probabilities for the product with `V` (three
//! `batch x heads x seq x keys` tensors per block), and SwiGLU kept `silu(g)`, its slope and
//! `u` besides the product. Here softmax keeps its output `P` alone (the same buffer the next
//! product keeps: `ds = P * (dy - sum(dy * P))`), and SwiGLU keeps `g` and `u` alone (`dg = dy *
//! u * silu'(g)`, `du = dy * silu(g)`, recomputed in the backward pass). That is one
//! scores-sized and one MLP-sized tensor less per block kept for the backward pass (BENCHMARKS.md,
//! "Memory modes"), and fewer passes over them.
//!
//! Other backends keep burn's own operations ([`softmax`], [`swiglu`] choose).

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

use crate::kernels;

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

/// A flex f32 tensor made contiguous (a no-op when it is).
fn contiguous(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused operations take f32 tensors");
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// A new flex tensor of `t`'s shape holding `v`.
fn like(t: &FlexTensor, v: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, t.layout().shape().clone()))
}

fn last_dim(t: &FlexTensor) -> usize {
    let shape = t.layout().shape();
    shape[shape.num_dims() - 1]
}

/// The attention probabilities `[batch, kv_heads, rows, keys]` of queries `q` against keys `k`
/// (flex), with the causal mask of [`kernels::CausalMask`], and the scale used.
fn causal_probs(q: &FlexTensor, k: &FlexTensor, seq: usize) -> (FlexTensor, f32) {
    let (qs, ks) = (q.layout().shape(), k.layout().shape());
    assert!(
        qs.num_dims() == 4
            && ks.num_dims() == 4
            && qs[3] == ks[3]
            && seq > 0
            && qs[2] % seq == 0
            && ks[2] >= seq,
        "causal attention of queries {qs:?} against keys {ks:?}, {seq} new positions"
    );
    let (rows, keys, hd) = (qs[2], ks[2], qs[3]);
    let scale = 1.0 / (hd as f32).sqrt();
    let scores = contiguous(Flex::float_matmul(
        q.clone(),
        Flex::float_swap_dims(k.clone(), 2, 3),
    ));
    let mut p = vec![0f32; values(&scores).len()];
    let mask = kernels::CausalMask {
        group_rows: rows,
        seq,
        past: keys - seq,
        scale,
    };
    kernels::causal_softmax_into(values(&scores), &mut p, keys, mask);
    (like(&scores, p), scale)
}

impl FusedBackend for Flex {
    fn swiglu_matmul(act: FlexTensor, _g: FlexTensor, _u: FlexTensor, a: FlexTensor) -> FlexTensor {
        Flex::float_matmul(act, a)
    }

    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, seq: usize) -> FlexTensor {
        let (p, _) = causal_probs(&q, &k, seq);
        Flex::float_matmul(p, v)
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

/// `z = act a` with `act = silu(g) * u`: `da = act^T dz` with `act` recomputed from the kept `g`
/// and `u` (SwiGLU's own kept inputs, so no new memory), `dact = dz a^T` (summed at `act` with
/// the gradient of the frozen product, then through SwiGLU's backward once).
#[derive(Debug)]
struct SwigluMatmulBackward;

impl Backward<Flex, 2> for SwigluMatmulBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_act, node_a] = ops.parents;
        let dz = grads.consume::<Flex>(&ops.node);
        let (g, u, a) = ops.state;
        if let Some(node) = node_a {
            let act = Flex::swiglu(g, u);
            let da = Flex::float_matmul(Flex::float_swap_dims(act, 0, 1), dz.clone());
            grads.register::<Flex>(node.id, da);
        }
        if let Some(node) = node_act {
            let dact = Flex::float_matmul(dz, Flex::float_swap_dims(a, 0, 1));
            grads.register::<Flex>(node.id, dact);
        }
    }
}

/// Attention's gradients from the kept `q`, `k` and `v`: the probabilities are recomputed (one
/// `q k^T` product and a softmax per block), then `dv = P^T dy`, `dP = dy v^T`, `ds = P * (dP -
/// sum(dP * P)) / sqrt(hd)`, `dq = ds k`, `dk = ds^T q`.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (q, k, v, seq) = ops.state;
        let (p, scale) = causal_probs(&q, &k, seq);
        if let Some(node) = node_v {
            let dv = Flex::float_matmul(Flex::float_swap_dims(p.clone(), 2, 3), dy.clone());
            grads.register::<Flex>(node.id, dv);
        }
        if node_q.is_none() && node_k.is_none() {
            return;
        }
        let dp = contiguous(Flex::float_matmul(dy, Flex::float_swap_dims(v, 2, 3)));
        let mut ds = vec![0f32; values(&p).len()];
        kernels::softmax_grad_into(values(&p), values(&dp), &mut ds, last_dim(&p), scale);
        drop(dp);
        let ds = like(&p, ds);
        drop(p);
        if let Some(node) = node_q {
            grads.register::<Flex>(node.id, Flex::float_matmul(ds.clone(), k));
        }
        if let Some(node) = node_k {
            grads.register::<Flex>(
                node.id,
                Flex::float_matmul(Flex::float_swap_dims(ds, 2, 3), q),
            );
        }
    }
}

impl<C: CheckpointStrategy> FusedBackend for Autodiff<Flex, C> {
    fn swiglu_matmul(
        act: FloatTensor<Self>,
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        a: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match SwigluMatmulBackward
            .prepare::<C>([act.node(), a.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let a = a.into_primitive();
                let (g, u) = (
                    contiguous(g.into_primitive()),
                    contiguous(u.into_primitive()),
                );
                let z = Flex::float_matmul(act.into_primitive(), a.clone());
                prep.finish((g, u, a), z)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::float_matmul(act.into_primitive(), a.into_primitive()))
            }
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
mod tests {
    use super::*;
    use burn::tensor::Device;
    use test_support::seeded_noise as seeded;

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Values and input gradients of `sum(f(x...) * w)` for the fused operations against burn's
    /// own, on rows with masked (-1e30) scores as causal attention writes them, under autodiff
    /// and without; and a strided input (a transpose) is read correctly.
    #[test]
    fn fused_operations_have_burns_values_and_gradients() {
        let device = Device::flex();
        let (rows, cols) = (67, 53);
        let mut sv = seeded(rows * cols, 7, 6.0);
        for r in 0..rows {
            for c in (cols - r % cols)..cols {
                sv[r * cols + c] = -1e30;
            }
        }
        let s = Tensor::<2>::from_data(TensorData::new(sv, [rows, cols]), &device);
        let w = Tensor::<2>::from_data(
            TensorData::new(seeded(rows * cols, 11, 1.0), [rows, cols]),
            &device,
        );
        assert!(max_diff(softmax(s.clone()), activation::softmax(s.clone(), 1)) < 5e-6);
        let grad = |f: &dyn Fn(Tensor<2>) -> Tensor<2>| {
            let x = s.clone().autodiff().require_grad();
            let y = f(x.clone());
            let g = (y.clone() * w.clone()).sum().backward();
            (y.inner(), x.grad(&g).expect("input gradient"))
        };
        let (ya, ga) = grad(&softmax);
        let (yb, gb) = grad(&|t| activation::softmax(t, 1));
        assert!(max_diff(ya, yb) < 5e-6);
        let d = max_diff(ga, gb);
        assert!(d < 5e-6, "softmax gradients differ by {d}");
        let st = s.clone().transpose();
        assert!(max_diff(softmax(st.clone()), activation::softmax(st, 1)) < 5e-6);

        let g = Tensor::<2>::from_data(
            TensorData::new(seeded(rows * cols, 5, 9.0), [rows, cols]),
            &device,
        );
        let u = Tensor::<2>::from_data(
            TensorData::new(seeded(rows * cols, 3, 2.0), [rows, cols]),
            &device,
        );
        let plain = activation::silu(g.clone()) * u.clone();
        assert!(max_diff(swiglu(g.clone(), u.clone()), plain.clone()) < 1e-5);
        assert!(
            max_diff(
                swiglu(g.clone().transpose(), u.clone().transpose()),
                plain.transpose()
            ) < 1e-5
        );
        let grads = |f: &dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<2>| {
            let (ga, ua) = (
                g.clone().autodiff().require_grad(),
                u.clone().autodiff().require_grad(),
            );
            let y = f(ga.clone(), ua.clone());
            let gr = (y.clone() * w.clone()).sum().backward();
            (y.inner(), ga.grad(&gr).unwrap(), ua.grad(&gr).unwrap())
        };
        let (ya, dga, dua) = grads(&swiglu);
        let (yb, dgb, dub) = grads(&|a, b| activation::silu(a) * b);
        assert!(max_diff(ya, yb) < 1e-5);
        let (dg, du) = (max_diff(dga, dgb), max_diff(dua, dub));
        assert!(
            dg < 1e-4 && du < 1e-5,
            "swiglu gradients differ by {dg}, {du}"
        );
        // Only one input tracked: the other gets no gradient and the tracked one is right.
        let ga = g.clone().autodiff().require_grad();
        let y = swiglu(ga.clone(), u.clone().autodiff());
        let gr = (y * w.clone()).sum().backward();
        assert!(max_diff(ga.grad(&gr).unwrap(), dgb_only(&g, &u, &w)) < 1e-4);
    }

    /// The fused attention against the same attention in burn's operations, values and the
    /// gradients of `q`, `k` and `v` under autodiff: grouped KV heads (3 queries per KV head),
    /// a prompt with no cache, new positions after cached ones, and one decoded position.
    #[test]
    fn fused_attention_has_the_values_and_gradients_of_burns_operations() {
        let device = Device::flex();
        let (batch, nkv, g, hd) = (2, 2, 3, 16);
        // The last is large enough to run row-parallel, in chunks that straddle score matrices.
        for (seq, keys) in [(9, 9), (5, 12), (1, 7), (40, 40), (100, 130)] {
            let t = |dims: [usize; 4], seed: u32| {
                let n = dims.iter().product();
                Tensor::<4>::from_data(TensorData::new(seeded(n, seed, 2.0), dims), &device)
            };
            let q = t([batch, nkv, g * seq, hd], 1);
            let k = t([batch, nkv, keys, hd], 2);
            let v = t([batch, nkv, keys, hd], 3);
            let w = t([batch, nkv, g * seq, hd], 4);
            let run = |fused: bool| {
                let (qa, ka, va) = (
                    q.clone().autodiff().require_grad(),
                    k.clone().autodiff().require_grad(),
                    v.clone().autodiff().require_grad(),
                );
                let o = if fused {
                    causal_attention(qa.clone(), ka.clone(), va.clone(), seq).expect("flex")
                } else {
                    crate::model::attention_by_ops(qa.clone(), ka.clone(), va.clone(), seq)
                };
                let gr = (o.clone() * w.clone()).sum().backward();
                let flat = |t: Tensor<4>| {
                    let [a, b, c, d] = t.dims();
                    t.reshape([a * b * c, d])
                };
                [
                    flat(o.inner()),
                    flat(qa.grad(&gr).unwrap()),
                    flat(ka.grad(&gr).unwrap()),
                    flat(va.grad(&gr).unwrap()),
                ]
            };
            let (ours, theirs) = (run(true), run(false));
            for (name, (a, b)) in ["value", "dq", "dk", "dv"]
                .iter()
                .zip(ours.into_iter().zip(theirs))
            {
                let d = max_diff(a, b);
                assert!(d < 2e-5, "seq {seq}, keys {keys}: {name} differs by {d}");
            }
            // Without autodiff the value is the same.
            let plain = causal_attention(q.clone(), k.clone(), v.clone(), seq).unwrap();
            let by_ops = crate::model::attention_by_ops(q.clone(), k.clone(), v.clone(), seq);
            let [a, b, c, d] = plain.dims();
            assert!(
                max_diff(
                    plain.reshape([a * b * c, d]),
                    by_ops.reshape([a * b * c, d])
                ) < 2e-5
            );
        }
    }

    /// SwiGLU's down projection with the LoRA `A` product taken by [`swiglu_matmul`] (the
    /// product recomputed in the backward pass) against the same in burn's operations: the value
    /// and the gradients of `g`, `u`, `A` and `B`.
    #[test]
    fn swiglu_matmul_has_the_gradients_of_the_kept_product() {
        let device = Device::flex();
        let (n, ffn, r, out) = (70, 48, 4, 20);
        let t = |dims: [usize; 2], seed: u32, scale: f32| {
            Tensor::<2>::from_data(
                TensorData::new(seeded(dims[0] * dims[1], seed, scale), dims),
                &device,
            )
        };
        let (g, u, a, b, w) = (
            t([n, ffn], 1, 4.0),
            t([n, ffn], 2, 2.0),
            t([ffn, r], 3, 0.5),
            t([r, out], 4, 0.5),
            t([ffn, out], 5, 0.5),
        );
        let wo = t([n, out], 6, 1.0);
        let run = |fused: bool| {
            let leaves: Vec<Tensor<2>> = [&g, &u, &a, &b]
                .iter()
                .map(|x| (*x).clone().autodiff().require_grad())
                .collect();
            let (gl, ul, al, bl) = (&leaves[0], &leaves[1], &leaves[2], &leaves[3]);
            let act = swiglu(gl.clone(), ul.clone());
            let low = if fused {
                swiglu_matmul(act.clone(), gl.clone(), ul.clone(), al.clone()).expect("flex")
            } else {
                (activation::silu(gl.clone()) * ul.clone()).matmul(al.clone())
            };
            let y = act.matmul(w.clone().autodiff()) + low.matmul(bl.clone());
            let gr = (y.clone() * wo.clone()).sum().backward();
            let mut out = vec![y.inner()];
            out.extend(leaves.iter().map(|l| l.grad(&gr).expect("gradient")));
            out
        };
        for (name, (x, y)) in ["value", "dg", "du", "da", "db"]
            .iter()
            .zip(run(true).into_iter().zip(run(false)))
        {
            let scale: f32 = y.clone().abs().max().into_scalar();
            let d = max_diff(x, y);
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{name} differs by {d} (scale {scale})"
            );
        }
    }

    fn dgb_only(g: &Tensor<2>, u: &Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        let ga = g.clone().autodiff().require_grad();
        let y = activation::silu(ga.clone()) * u.clone().autodiff();
        let gr = (y * w.clone()).sum().backward();
        ga.grad(&gr).unwrap()
    }
}
