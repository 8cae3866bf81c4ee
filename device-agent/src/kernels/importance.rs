//! LoRA-gradient importance of one projection in a single pass over its frozen weight.
//!
//! LoRAPrune estimates the gradient of a frozen weight from its adapter's gradients,
//! `G = s (dA B + A dB - dA dB)`, and scores each element `|G ⊙ (W0 + s A B)|`; a head or an
//! MLP channel sums its elements along one axis. Composed from tensor operations that is five
//! rank-`r` products and as many element-wise passes, each writing a whole `[in, out]` matrix:
//! about half a second per step on the 135M model, a third of a step again while importance
//! accumulates. Here each task takes a few rows of `W0`, forms their `G` and `W` entries in two
//! row-long buffers with fused multiply-adds (`4 r` per element) and keeps only the sums.
//!
//! Each element's terms are added in the order of the rank, and column sums add the rows in
//! their order, so the result is the same whatever the thread count; it differs from the tensor
//! composition in the last bits (the test holds it to an f64 reference).

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{flex_f32, slice, wrap};

/// Rows of `W0` one task scores.
const ROWS_PER_TASK: usize = 16;

/// Which way a projection's element scores are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Along {
    /// Over the input rows: one sum per output column (`q`, `k`, `v`, `gate`, `up`).
    Inputs,
    /// Over the output columns: one sum per input row (`o`, `down`).
    Outputs,
}

/// The sums along `along` of `|s (dA B + A dB - dA dB) ⊙ (W0 + s A B)|` for a frozen weight `w0`
/// (`[in, out]`), its adapter `a` (`[in, r]`), `b` (`[r, out]`) and their accumulated gradients
/// `da`, `db` (same shapes), at scale `s`. `None` unless every operand is an fp32 flex tensor
/// without autodiff (the caller then composes burn's operations) or when the shapes disagree.
pub fn lora_importance(
    w0: &Tensor<2>,
    a: &Tensor<2>,
    b: &Tensor<2>,
    da: &Tensor<2>,
    db: &Tensor<2>,
    s: f32,
    along: Along,
) -> Option<Tensor<1>> {
    let [n_in, n_out] = w0.dims();
    let [a_in, r] = a.dims();
    if a_in != n_in
        || da.dims() != [n_in, r]
        || b.dims() != [r, n_out]
        || db.dims() != [r, n_out]
        || n_in == 0
        || n_out == 0
    {
        return None;
    }
    let (w0, a, b, da, db) = (
        flex_f32(w0)?,
        flex_f32(a)?,
        flex_f32(b)?,
        flex_f32(da)?,
        flex_f32(db)?,
    );
    let sums = importance_sums(
        Factors {
            w0: slice(&w0),
            a: slice(&a),
            b: slice(&b),
            da: slice(&da),
            db: slice(&db),
            rank: r,
            n_out,
            scale: s,
        },
        along,
    );
    let n = sums.len();
    Some(wrap(sums, [n]))
}

/// One projection's operands as row-major slices.
#[derive(Clone, Copy)]
struct Factors<'a> {
    w0: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    da: &'a [f32],
    db: &'a [f32],
    rank: usize,
    n_out: usize,
    scale: f32,
}

fn importance_sums(f: Factors<'_>, along: Along) -> Vec<f32> {
    let n_out = f.n_out;
    let n_in = f.w0.len() / n_out;
    let tasks = n_in.div_ceil(ROWS_PER_TASK);
    // One task's rows: their scores block by block (`w`), each block's sums handed to `sink`.
    let task = |t: usize, sink: &mut dyn FnMut(usize, &[f32])| {
        let rows = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(n_in);
        let mut g = vec![0.0f32; BLOCK_ROWS * n_out];
        let mut w = vec![0.0f32; BLOCK_ROWS * n_out];
        for i0 in rows.step_by(BLOCK_ROWS) {
            let m = BLOCK_ROWS.min(n_in - i0);
            let (g, w) = (&mut g[..m * n_out], &mut w[..m * n_out]);
            w.copy_from_slice(&f.w0[i0 * n_out..(i0 + m) * n_out]);
            score_block(f, i0, g, w);
            for (k, row) in w.chunks_exact(n_out).enumerate() {
                sink(i0 + k, row);
            }
        }
    };
    match along {
        Along::Outputs => {
            let mut sums = vec![0.0f32; n_in];
            sums.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(t, out)| {
                    task(t, &mut |i, row| {
                        out[i - t * ROWS_PER_TASK] = row.iter().sum()
                    });
                });
            sums
        }
        Along::Inputs => {
            // Each task's column sums, then added task by task: the rows' order, whatever ran
            // where.
            let partial: Vec<Vec<f32>> = (0..tasks)
                .into_par_iter()
                .map(|t| {
                    let mut acc = vec![0.0f32; n_out];
                    task(t, &mut |_, row| add_into(row, &mut acc));
                    acc
                })
                .collect();
            let mut sums = vec![0.0f32; n_out];
            for p in &partial {
                add_into(p, &mut sums);
            }
            sums
        }
    }
}

/// Rows of `W0` scored together, so that each rank term's `B` and `dB` tiles come from memory
/// once for all of them.
const BLOCK_ROWS: usize = 4;
/// Output columns per tile: a block's `g` and `w` tiles and one rank term's `B` and `dB` tiles
/// (4 x 512 x 2 + 2 x 512 floats, 20 KiB) stay in the first-level cache.
const TILE: usize = 512;

multiversion! {
    /// The element scores of rows `i0..i0 + w.len() / n_out` into `w`, which holds those rows
    /// of `W0` (`g` is scratch of the same length): `g = dA_i B + A_i dB - dA_i dB` and
    /// `w += s A_i B`, rank term by rank term, then `w = |s g w|`.
    fn score_block(f: Factors<'_>, i0: usize, g: &mut [f32], w: &mut [f32]) {
        let (n, r, s) = (f.n_out, f.rank, f.scale);
        let rows = w.len() / n;
        g.fill(0.0);
        for t0 in (0..n).step_by(TILE) {
            let t1 = (t0 + TILE).min(n);
            for k in 0..r {
                let bk = &f.b[k * n + t0..k * n + t1];
                let dbk = &f.db[k * n + t0..k * n + t1];
                for row in 0..rows {
                    let x = f.da[(i0 + row) * r + k];
                    let y = f.a[(i0 + row) * r + k];
                    let sy = s * y;
                    let gt = &mut g[row * n + t0..row * n + t1];
                    let wt = &mut w[row * n + t0..row * n + t1];
                    for (((gj, wj), &bv), &dbv) in gt.iter_mut().zip(wt.iter_mut()).zip(bk).zip(dbk) {
                        let t = x.mul_add(bv, *gj);
                        let t = y.mul_add(dbv, t);
                        *gj = (-x).mul_add(dbv, t);
                        *wj = sy.mul_add(bv, *wj);
                    }
                }
            }
        }
        for (wj, &gj) in w.iter_mut().zip(g.iter()) {
            *wj = (s * gj * *wj).abs();
        }
    }
}

multiversion! {
    /// `acc += x`, element by element.
    fn add_into(x: &[f32], acc: &mut [f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::uniform;
    use burn::tensor::{Device, TensorData};

    fn tensor(v: &[f32], dims: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), dims), &Device::flex())
    }

    /// The same sums in f64, element by element from the definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        w0: &[f32],
        a: &[f32],
        b: &[f32],
        da: &[f32],
        db: &[f32],
        (n_in, r, n_out): (usize, usize, usize),
        s: f64,
        along: Along,
    ) -> Vec<f64> {
        let mut sums = vec![0.0f64; if along == Along::Inputs { n_out } else { n_in }];
        for i in 0..n_in {
            for j in 0..n_out {
                let (mut g, mut ab) = (0.0f64, 0.0f64);
                for k in 0..r {
                    let (x, y) = (da[i * r + k] as f64, a[i * r + k] as f64);
                    let (bv, dbv) = (b[k * n_out + j] as f64, db[k * n_out + j] as f64);
                    g += x * bv + y * dbv - x * dbv;
                    ab += y * bv;
                }
                let e = (s * g * (w0[i * n_out + j] as f64 + s * ab)).abs();
                match along {
                    Along::Inputs => sums[j] += e,
                    Along::Outputs => sums[i] += e,
                }
            }
        }
        sums
    }

    /// Both axes, ragged row counts (not a multiple of a task), rank 1 and 16, against the f64
    /// definition; and the tensor composition LoRA-gradient scoring used before, which it must
    /// match up to summation order. Mismatched shapes are declined.
    #[test]
    fn one_pass_scores_match_the_definition_and_the_tensor_composition() {
        for (n_in, r, n_out, seed) in [(37, 16, 53, 1), (16, 1, 96, 2), (100, 8, 24, 3)] {
            let w0 = uniform(n_in * n_out, seed, -0.5, 0.5);
            let a = uniform(n_in * r, seed + 10, -0.3, 0.3);
            let b = uniform(r * n_out, seed + 20, -0.3, 0.3);
            let da = uniform(n_in * r, seed + 30, -0.02, 0.02);
            let db = uniform(r * n_out, seed + 40, -0.02, 0.02);
            let s = 2.0f32;
            let t = |v: &[f32], d| tensor(v, d);
            let (tw, ta, tb, tda, tdb) = (
                t(&w0, [n_in, n_out]),
                t(&a, [n_in, r]),
                t(&b, [r, n_out]),
                t(&da, [n_in, r]),
                t(&db, [r, n_out]),
            );
            // The tensor composition (what `Tuner` computes off flex).
            let g = (tda.clone().matmul(tb.clone()) + ta.clone().matmul(tdb.clone())
                - tda.clone().matmul(tdb.clone()))
            .mul_scalar(s);
            let imp = (g * (tw.clone() + ta.clone().matmul(tb.clone()).mul_scalar(s))).abs();
            for (along, dim) in [(Along::Inputs, 0), (Along::Outputs, 1)] {
                let got: Vec<f32> = lora_importance(&tw, &ta, &tb, &tda, &tdb, s, along)
                    .expect("fp32 flex operands")
                    .into_data()
                    .try_to_vec()
                    .unwrap();
                let want = reference(&w0, &a, &b, &da, &db, (n_in, r, n_out), s as f64, along);
                let composed: Vec<f32> = imp.clone().sum_dim(dim).into_data().try_to_vec().unwrap();
                assert_eq!(got.len(), want.len());
                assert_eq!(composed.len(), want.len());
                for (n, ((&x, &y), &c)) in got.iter().zip(&want).zip(&composed).enumerate() {
                    let tol = 1e-5 * y.abs().max(1e-3);
                    assert!(
                        (x as f64 - y).abs() <= tol,
                        "{n_in}x{r}x{n_out} {along:?} [{n}]: {x} vs f64 {y}"
                    );
                    assert!((c as f64 - y).abs() <= tol, "composition {c} vs f64 {y}");
                }
            }
        }
        let z = |d| Tensor::<2>::zeros(d, &Device::flex());
        assert!(lora_importance(
            &z([4, 6]),
            &z([4, 2]),
            &z([2, 5]),
            &z([4, 2]),
            &z([2, 5]),
            1.0,
            Along::Inputs
        )
        .is_none());
    }
}
