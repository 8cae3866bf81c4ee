//! LoRA-gradient importance of one projection in a single pass over its frozen weight.
//!
//! LoRAPrune estimates the gradient of a frozen weight from its adapter's gradients,
//! `G = s (dA B + A dB - dA dB)`, and scores each element `|G ⊙ (W0 + s A B)|`; a head or an
//! MLP channel sums its elements along one axis. Composed from tensor operations that is five
//! rank-`r` products and as many element-wise passes, each writing a whole `[in, out]` matrix:
//! about half a second per step on the 135M model, a third of a step again while importance
//! accumulates. Here each task takes a few rows of `W0`, forms their `G` and `W` entries with
//! fused multiply-adds (`4 r` per element) and keeps only the sums. With AVX-512 or AVX2 a tile
//! of rows by columns keeps its `G` and `W` in vector registers for the whole rank loop
//! ([`x86`]); elsewhere the entries go through two row-long buffers, rank term by rank term.
//!
//! Each element's terms are added in the order of the rank, with the same operations on every
//! path (so the scores do not depend on the CPU), and column sums add the rows in
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

/// The element scores of rows `i0..i0 + w.len() / n_out` into `w`, which holds those rows of
/// `W0` (`g` is scratch of the same length): `g = dA_i B + A_i dB - dA_i dB` and `w += s A_i B`,
/// rank term by rank term, then `w = |s g w|`.
fn score_block(f: Factors<'_>, i0: usize, g: &mut [f32], w: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::score_block(f, i0, w) {
        return;
    }
    score_block_portable(f, i0, g, w);
}

multiversion! {
    /// [`score_block`] through two row-long buffers: the whole row's `g` and `w` move one rank
    /// term at a time.
    fn score_block_portable(f: Factors<'_>, i0: usize, g: &mut [f32], w: &mut [f32]) {
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

/// The register tiles: `R` rows by `NV` vectors of columns, their `g` and `w` held across the
/// rank loop, each rank term's `B` and `dB` vectors loaded once for the `R` rows. AVX-512 takes
/// 4 rows by 2 vectors (32 columns: 16 accumulators of its 32 registers, and 8 independent
/// chains of `g`'s three dependent multiply-adds per rank term, enough to hide their latency);
/// AVX2 2 rows by 2 vectors (16 columns; it has 16 registers).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::Factors;
    use crate::cpu::Isa;
    use std::arch::x86_64::*;

    /// What one tile call covers: rows `i0..i0 + R` of `w` (`R` rows of `n` columns at stride
    /// `n`), columns `c..c + NV * lanes`.
    #[derive(Clone, Copy)]
    struct Tile {
        w: *mut f32,
        n: usize,
        b: *const f32,
        db: *const f32,
        /// `dA`'s and `A`'s row `i0` (rows at stride `r`).
        da: *const f32,
        a: *const f32,
        r: usize,
        s: f32,
        c: usize,
    }

    macro_rules! tile {
        ($name:ident, $feature:literal, $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident, $mul:ident, $lanes:literal) => {
            /// # Safety
            /// The CPU has the target features; `t.w` holds `R` rows of `t.n` values, writable;
            /// `t.b` and `t.db` hold `t.r` rows of `t.n`; `t.da` and `t.a` hold `R` rows of
            /// `t.r`; `t.c + NV * lanes <= t.n`.
            #[target_feature(enable = $feature)]
            unsafe fn $name<const R: usize, const NV: usize>(t: Tile) {
                let (n, r, c) = (t.n, t.r, t.c);
                let mut g = [[$zero(); NV]; R];
                let mut v = [[$zero(); NV]; R];
                for (i, vi) in v.iter_mut().enumerate() {
                    for (q, x) in vi.iter_mut().enumerate() {
                        *x = $load(t.w.add(i * n + c + q * $lanes));
                    }
                }
                for k in 0..r {
                    let mut bk = [$zero(); NV];
                    let mut dbk = [$zero(); NV];
                    for q in 0..NV {
                        bk[q] = $load(t.b.add(k * n + c + q * $lanes));
                        dbk[q] = $load(t.db.add(k * n + c + q * $lanes));
                    }
                    for i in 0..R {
                        let x = *t.da.add(i * r + k);
                        let y = *t.a.add(i * r + k);
                        let (xv, nxv, yv, syv) = ($set1(x), $set1(-x), $set1(y), $set1(t.s * y));
                        for q in 0..NV {
                            let u = $fma(xv, bk[q], g[i][q]);
                            let u = $fma(yv, dbk[q], u);
                            g[i][q] = $fma(nxv, dbk[q], u);
                            v[i][q] = $fma(syv, bk[q], v[i][q]);
                        }
                    }
                }
                // `s g w`, its sign cleared by the caller.
                let sv = $set1(t.s);
                for i in 0..R {
                    for q in 0..NV {
                        $store(
                            t.w.add(i * n + c + q * $lanes),
                            $mul($mul(sv, g[i][q]), v[i][q]),
                        );
                    }
                }
            }
        };
    }

    tile!(
        tile_avx2,
        "avx2,fma",
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        8
    );
    tile!(
        tile_avx512,
        "avx512f",
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        16
    );

    /// [`super::score_block`] by register tiles; `false` (nothing done) without AVX2 or AVX-512.
    pub(super) fn score_block(f: Factors<'_>, i0: usize, w: &mut [f32]) -> bool {
        score_block_on(Isa::detect(), f, i0, w).is_some()
    }

    /// The same with `isa`'s tiles, or the best this process may use if that is less (`None`
    /// when neither tile runs here); returns the instruction set used.
    pub(super) fn score_block_on(
        isa: Isa,
        f: Factors<'_>,
        i0: usize,
        w: &mut [f32],
    ) -> Option<Isa> {
        let isa = isa.min(Isa::detect());
        match isa {
            Isa::Avx512 => by_tiles::<4, 2, 16>(f, i0, w, |t, rows| match rows {
                // SAFETY: AVX-512F is present; `by_tiles` checked the extents.
                4 => unsafe { tile_avx512::<4, 2>(t) },
                // SAFETY: as above.
                _ => unsafe { tile_avx512::<1, 2>(t) },
            }),
            Isa::Avx2Fma => by_tiles::<2, 2, 8>(f, i0, w, |t, rows| match rows {
                // SAFETY: AVX2 and FMA are present; `by_tiles` checked the extents.
                2 => unsafe { tile_avx2::<2, 2>(t) },
                // SAFETY: as above.
                _ => unsafe { tile_avx2::<1, 2>(t) },
            }),
            _ => return None,
        }
        Some(isa)
    }

    /// `w`'s rows `R` at a time (the rest one at a time) in tiles of `NV * LANES` columns through
    /// `tile(t, rows)`; the columns past the last whole tile through one more tile on copies
    /// padded with zeros (a pruned projection keeps any number of channels); then every score's
    /// sign cleared.
    fn by_tiles<const R: usize, const NV: usize, const LANES: usize>(
        f: Factors<'_>,
        i0: usize,
        w: &mut [f32],
        tile: impl Fn(Tile, usize),
    ) {
        let (n, r, s) = (f.n_out, f.rank, f.scale);
        let rows = w.len() / n;
        let width = NV * LANES;
        let whole = n - n % width;
        // The extents every tile reads and writes.
        assert!(
            w.len() == rows * n
                && f.b.len() >= r * n
                && f.db.len() >= r * n
                && f.a.len() >= (i0 + rows) * r
                && f.da.len() >= (i0 + rows) * r,
            "importance tile operands"
        );
        // `B`'s and `dB`'s last columns, each row padded to a tile's width.
        let tail = n - whole;
        let padded = |m: &[f32]| {
            let mut p = vec![0.0f32; if tail > 0 { r * width } else { 0 }];
            if tail > 0 {
                for (k, row) in p.chunks_exact_mut(width).enumerate() {
                    row[..tail].copy_from_slice(&m[k * n + whole..(k + 1) * n]);
                }
            }
            p
        };
        let (b_tail, db_tail) = (padded(f.b), padded(f.db));
        let mut w_tail = vec![0.0f32; R * width];
        let mut i = 0;
        while i < rows {
            let m = if rows - i >= R { R } else { 1 };
            let at = |w: *mut f32, n: usize, b: &[f32], db: &[f32], c: usize| Tile {
                w,
                n,
                b: b.as_ptr(),
                db: db.as_ptr(),
                da: f.da[(i0 + i) * r..].as_ptr(),
                a: f.a[(i0 + i) * r..].as_ptr(),
                r,
                s,
                c,
            };
            for c in (0..whole).step_by(width) {
                tile(at(w.as_mut_ptr().wrapping_add(i * n), n, f.b, f.db, c), m);
            }
            if tail > 0 {
                for (j, t) in w_tail.chunks_exact_mut(width).take(m).enumerate() {
                    t[..tail].copy_from_slice(&w[(i + j) * n + whole..(i + j + 1) * n]);
                }
                tile(at(w_tail.as_mut_ptr(), width, &b_tail, &db_tail, 0), m);
                for (j, t) in w_tail.chunks_exact(width).take(m).enumerate() {
                    w[(i + j) * n + whole..(i + j + 1) * n].copy_from_slice(&t[..tail]);
                }
            }
            i += m;
        }
        for x in w.iter_mut() {
            *x = x.abs();
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

    /// Both register tiles (where the CPU has them) give, bit for bit, what the row-buffer path
    /// gives: on ragged rows and columns (not multiples of a tile) and at rank 1 and 16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_register_tiles_score_each_element_as_the_row_buffers_do() {
        use crate::cpu::Isa;
        let mut ran = Vec::new();
        for (n_in, r, n_out, seed) in [(7, 16, 75, 5), (4, 1, 32, 6), (9, 3, 33, 7), (5, 2, 6, 8)] {
            let w0 = uniform(n_in * n_out, seed, -0.5, 0.5);
            let a = uniform(n_in * r, seed + 10, -0.3, 0.3);
            let b = uniform(r * n_out, seed + 20, -0.3, 0.3);
            let da = uniform(n_in * r, seed + 30, -0.02, 0.02);
            let db = uniform(r * n_out, seed + 40, -0.02, 0.02);
            let f = Factors {
                w0: &w0,
                a: &a,
                b: &b,
                da: &da,
                db: &db,
                rank: r,
                n_out,
                scale: 1.5,
            };
            // Rows 1.. of the weight: a block that does not start at row 0.
            let rows = &w0[n_out..];
            let mut want = rows.to_vec();
            score_block_portable(f, 1, &mut vec![0.0; want.len()], &mut want);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for isa in [Isa::Avx2Fma, Isa::Avx512] {
                let mut got = rows.to_vec();
                if let Some(used) = x86::score_block_on(isa, f, 1, &mut got) {
                    assert_eq!(bits(&got), bits(&want), "{used} tiles, {n_in}x{r}x{n_out}");
                    ran.push(used);
                }
            }
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(!ran.is_empty(), "no tile ran on a CPU with AVX2 and FMA");
        }
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
