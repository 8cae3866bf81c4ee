//! The fused operations against the same computations in burn's operations: values and
//! gradients.

use super::*;
use crate::kernels::lora_grad::{ONE_PASS_COLS, ONE_PASS_ROWS};
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

/// SwiGLU's down projection with the LoRA `A` product taken by [`swiglu_matmul`] (the
/// product recomputed in the backward pass) against the same in burn's operations: the value
/// and the gradients of `g`, `u`, `A` and `B`.
#[test]
fn swiglu_matmul_has_the_gradients_of_the_kept_product() {
    // Rows below and above the one-pass LoRA gradients' threshold.
    for (n, ffn) in [(70, 48), (ONE_PASS_ROWS + 37, ONE_PASS_COLS + 5)] {
        swiglu_matmul_case(n, ffn);
    }
}

fn swiglu_matmul_case(n: usize, ffn: usize) {
    let device = Device::flex();
    let (r, out) = (4, 20);
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
            "{n} rows: {name} differs by {d} (scale {scale})"
        );
    }
}

/// A LoRA `A` product of RMSNorm's output through [`norm_matmul`] (the normed input
/// recomputed in the backward pass) against the same in burn's operations: the value and the
/// gradients of the pre-norm input, `A` and `B`.
#[test]
fn norm_matmul_has_the_gradients_of_the_kept_product() {
    for (n, d) in [(90, 40), (ONE_PASS_ROWS + 5, ONE_PASS_COLS + 11)] {
        norm_matmul_case(n, d);
    }
}

fn norm_matmul_case(n: usize, d: usize) {
    let device = Device::flex();
    let (r, out) = (4, 24);
    let t = |dims: [usize; 2], seed: u32, scale: f32| {
        Tensor::<2>::from_data(
            TensorData::new(seeded(dims[0] * dims[1], seed, scale), dims),
            &device,
        )
    };
    let (x, a, b, wp, wo) = (
        t([n, d], 1, 3.0),
        t([d, r], 2, 0.5),
        t([r, out], 3, 0.5),
        t([d, out], 4, 0.5),
        t([n, out], 5, 1.0),
    );
    let norm_w =
        Tensor::<1>::from_data(TensorData::new(seeded(d, 6, 1.0), [d]), &device).autodiff();
    let eps = 1e-5;
    let run = |fused: bool| {
        let leaves: Vec<Tensor<2>> = [&x, &a, &b]
            .iter()
            .map(|t| (*t).clone().autodiff().require_grad())
            .collect();
        let (xl, al, bl) = (&leaves[0], &leaves[1], &leaves[2]);
        // RMSNorm as `model::rms_norm` writes it.
        let ms = xl.clone().square().mean_dim(1);
        let h = xl.clone() * (ms + eps).sqrt().recip() * norm_w.clone().reshape([1, d]);
        let low = if fused {
            norm_matmul(h.clone(), xl.clone(), norm_w.clone(), al.clone(), eps).expect("flex")
        } else {
            h.clone().matmul(al.clone())
        };
        let y = h.matmul(wp.clone().autodiff()) + low.matmul(bl.clone());
        let gr = (y.clone() * wo.clone()).sum().backward();
        let mut out = vec![y.inner()];
        out.extend(leaves.iter().map(|l| l.grad(&gr).expect("gradient")));
        out
    };
    for (name, (p, q)) in ["value", "dx", "da", "db"]
        .iter()
        .zip(run(true).into_iter().zip(run(false)))
    {
        let scale: f32 = q.clone().abs().max().into_scalar();
        let diff = max_diff(p, q);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{n} rows: {name} differs by {diff} (scale {scale})"
        );
    }
}

fn dgb_only(g: &Tensor<2>, u: &Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    let ga = g.clone().autodiff().require_grad();
    let y = activation::silu(ga.clone()) * u.clone().autodiff();
    let gr = (y * w.clone()).sum().backward();
    ga.grad(&gr).unwrap()
}

/// A LoRA term added into a base product by [`lora_add`]: the value and the gradients of the
/// base output, `x A` and the scaled `B` equal burn's `y + low.matmul(sb)` (same products; only
/// where the add happens differs), with the base output untracked as well, and plain flex.
#[test]
fn lora_add_has_the_values_and_gradients_of_the_add() {
    for (n, out) in [(70, 45), (ONE_PASS_ROWS + 70, ONE_PASS_COLS + 45)] {
        lora_add_case(n, out);
    }
}

fn lora_add_case(n: usize, out: usize) {
    let device = Device::flex();
    let r = 8;
    let t = |len: usize, seed: u32, dims: [usize; 2]| {
        Tensor::<2>::from_data(TensorData::new(seeded(len, seed, 1.0), dims), &device)
    };
    let (y, low, sb, w) = (
        t(n * out, 1, [n, out]),
        t(n * r, 2, [n, r]),
        t(r * out, 3, [r, out]),
        t(n * out, 4, [n, out]),
    );
    let plain = y.clone() + low.clone().matmul(sb.clone());
    assert!(max_diff(lora_add(y.clone(), low.clone(), sb.clone()), plain.clone()) < 1e-6);
    for track_y in [true, false] {
        let run = |f: &dyn Fn(Tensor<2>, Tensor<2>, Tensor<2>) -> Tensor<2>| {
            let ya = if track_y {
                y.clone().autodiff().require_grad()
            } else {
                y.clone().autodiff()
            };
            let (la, sa) = (
                low.clone().autodiff().require_grad(),
                sb.clone().autodiff().require_grad(),
            );
            let z = f(ya.clone(), la.clone(), sa.clone());
            let g = (z.clone() * w.clone().autodiff()).sum().backward();
            (
                z.inner(),
                ya.grad(&g),
                la.grad(&g).unwrap(),
                sa.grad(&g).unwrap(),
            )
        };
        let (za, dya, dla, dsa) = run(&|a, b, c| lora_add(a, b, c));
        let (zb, dyb, dlb, dsb) = run(&|a, b, c| a + b.matmul(c));
        assert!(max_diff(za, zb) < 1e-6);
        assert_eq!(
            dya.is_some(),
            track_y,
            "the base output's gradient exactly when tracked"
        );
        if let (Some(a), Some(b)) = (dya, dyb) {
            assert!(max_diff(a, b) < 1e-6);
        }
        // `dsb` sums over the rows: its error grows with them.
        let scale: f32 = dsb.clone().abs().max().into_scalar();
        assert!(max_diff(dla, dlb) < 1e-5, "{n} rows: dlow");
        assert!(
            max_diff(dsa, dsb) < 1e-6 * scale.max(1.0) * 10.0,
            "{n} rows: dsb"
        );
    }
}

/// RoPE over the rows of a q product against `Rope::apply` on the split heads (burn's
/// operations): the same bits forward and in the input gradient under autodiff, for two
/// sequences at positions from 7 (as after cached positions), and from a strided input.
#[test]
fn rope_has_the_bits_of_burns_operations_forward_and_backward() {
    let device = Device::flex();
    let (batch, seq, heads, hd, start) = (2, 37, 3, 16, 7);
    let (rows, width) = (batch * seq, heads * hd);
    let rope = crate::model::Rope::new(hd, 64, 10_000.0, &device);
    let x = Tensor::<2>::from_data(
        TensorData::new(seeded(rows * width, 13, 3.0), [rows, width]),
        &device,
    );
    let w = Tensor::<2>::from_data(
        TensorData::new(seeded(rows * width, 17, 1.0), [rows, width]),
        &device,
    );
    let by_ops = |t: Tensor<2>| {
        let split = t.reshape([batch, seq, heads, hd]).swap_dims(1, 2);
        rope.apply(split, start)
            .swap_dims(1, 2)
            .reshape([rows, width])
    };
    let bits = |t: Tensor<2>| {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    assert_eq!(
        bits(rope.apply_rows(x.clone(), start, seq)),
        bits(by_ops(x.clone())),
        "forward"
    );
    // The same values as the left half of wider rows: a row stride of 2 * width.
    let wide = Tensor::cat(vec![x.clone(), w.clone()], 1).narrow(1, 0, width);
    assert_eq!(
        bits(rope.apply_rows(wide, start, seq)),
        bits(by_ops(x.clone())),
        "strided input"
    );
    let grad = |f: &dyn Fn(Tensor<2>) -> Tensor<2>| {
        let xa = x.clone().autodiff().require_grad();
        let y = f(xa.clone());
        let g = (y.clone() * w.clone()).sum().backward();
        (y.inner(), xa.grad(&g).expect("input gradient"))
    };
    let (ya, ga) = grad(&|t| rope.apply_rows(t, start, seq));
    let (yb, gb) = grad(&by_ops);
    assert_eq!(bits(ya), bits(yb), "forward under autodiff");
    assert_eq!(bits(ga), bits(gb), "input gradient");
}

/// RMSNorm in one pass against burn's operations: the value, the input gradient and, when the
/// weight is tracked, the weight gradient, on rows large enough to split across tasks and on a
/// strided input; rows of very different scales.
#[test]
fn rms_norm_has_burns_values_and_gradients() {
    let device = Device::flex();
    let (rows, d, eps) = (300, 576, 1e-5);
    let mut xv = seeded(rows * d, 23, 2.0);
    for (r, row) in xv.chunks_mut(d).enumerate() {
        let scale = [1e-3f32, 1.0, 40.0][r % 3];
        row.iter_mut().for_each(|v| *v *= scale);
    }
    let x = Tensor::<2>::from_data(TensorData::new(xv, [rows, d]), &device);
    let w1 = Tensor::<1>::from_data(TensorData::new(seeded(d, 29, 1.5), [d]), &device);
    let wo = Tensor::<2>::from_data(
        TensorData::new(seeded(rows * d, 31, 1.0), [rows, d]),
        &device,
    );
    let by_ops = |x: Tensor<2>, w: Tensor<1>| {
        let ms = x.clone().square().mean_dim(1);
        x * (ms + eps).sqrt().recip() * w.reshape([1, d])
    };
    let ours = rms_norm(x.clone(), &w1, eps).expect("flex f32");
    let rel = |a: Tensor<2>, b: Tensor<2>| {
        let scale: f32 = b.clone().abs().max().into_scalar();
        max_diff(a, b) / scale
    };
    assert!(rel(ours, by_ops(x.clone(), w1.clone())) < 1e-6);
    let wide = Tensor::cat(vec![x.clone(), wo.clone()], 1).narrow(1, 0, d);
    assert!(
        rel(
            rms_norm(wide, &w1, eps).unwrap(),
            by_ops(x.clone(), w1.clone())
        ) < 1e-6
    );
    let grads = |f: &dyn Fn(Tensor<2>, Tensor<1>) -> Tensor<2>, track_w: bool| {
        let xa = x.clone().autodiff().require_grad();
        let wa = if track_w {
            w1.clone().autodiff().require_grad()
        } else {
            w1.clone().autodiff()
        };
        let y = f(xa.clone(), wa.clone());
        let g = (y.clone() * wo.clone()).sum().backward();
        (y.inner(), xa.grad(&g).expect("input gradient"), wa.grad(&g))
    };
    for track_w in [false, true] {
        let (ya, dxa, dwa) = grads(&|x, w| rms_norm(x, &w, eps).unwrap(), track_w);
        let (yb, dxb, dwb) = grads(&by_ops, track_w);
        assert!(rel(ya, yb) < 1e-6);
        // Row by row: a row's gradient scales as 1 / its scale.
        for r in 0..3 {
            let (a, b) = (dxa.clone().narrow(0, r, 1), dxb.clone().narrow(0, r, 1));
            let e = rel(a, b);
            assert!(
                e < 1e-5,
                "input gradient of row {r} off by {e:e} of its largest"
            );
        }
        let e = rel(dxa, dxb);
        assert!(e < 1e-5, "input gradient off by {e:e}");
        match (dwa, dwb) {
            (Some(a), Some(b)) => {
                let e = rel(a.reshape([1, d]), b.reshape([1, d]));
                assert!(track_w && e < 1e-5, "weight gradient off by {e:e}");
            }
            (None, None) => assert!(!track_w),
            _ => panic!("a weight gradient from one path only"),
        }
    }
}
