//! Products of a few activation rows with a large fp32 weight matrix: decoding, where each new
//! token is one row. Flex hands a product below about 7 M multiply-adds to `gemm` on one
//! thread, and a decoded token's projections (at most 49152 x 576) are all below it, so fp32
//! decoding read its weights through one core. Here the weight's rows (slabs of the inner
//! dimension, each giving a partial output row; for a transposed weight such as the tied LM
//! head, blocks of output entries) are split across rayon's threads, each streaming contiguous
//! memory.
//!
//! Sums run in the order of the inner dimension with fused multiply-adds, so a product here
//! differs from gemm's in the last bits, not more (tested against burn's matmul).

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

use super::{flex_f32, slice, wrap};

/// Rows of `x` up to which [`skinny_matmul`] computes the product (one per decoded sequence).
pub const SKINNY_ROWS: usize = 4;
/// Rows of a row-major `[k, m]` weight one task reads: a contiguous slab, summed into its own
/// partial output row (splitting the columns instead made every task stride through all `k`
/// rows, at half the bandwidth of one thread reading whole rows).
const ROWS_PER_TASK: usize = 128;
/// Output columns of one task on a transposed weight (one dot product of length `k` each).
const DOTS_PER_TASK: usize = 256;
/// Multiply-adds below which a product stays on the calling thread.
const SERIAL_MACS: usize = 1 << 15;

multiversion! {
    /// `out += x w` for one row `x` and a row-major `[x.len(), out.len()]` weight `w`. Four
    /// weight rows go through each output entry at once (one load and store of the entry per
    /// four rows instead of per row), still added in row order, so the sums are those of one
    /// row at a time bit for bit.
    fn axpy_rows(x: &[f32], w: &[f32], out: &mut [f32]) {
        let m = out.len();
        let (x4, x1) = x.split_at(x.len() / 4 * 4);
        let (w4, w1) = w.split_at(x4.len() * m);
        for (xs, rows) in x4.chunks_exact(4).zip(w4.chunks_exact(4 * m)) {
            let (r0, rest) = rows.split_at(m);
            let (r1, rest) = rest.split_at(m);
            let (r2, r3) = rest.split_at(m);
            for ((((a, &v0), &v1), &v2), &v3) in out.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
                let mut s = v0.mul_add(xs[0], *a);
                s = v1.mul_add(xs[1], s);
                s = v2.mul_add(xs[2], s);
                *a = v3.mul_add(xs[3], s);
            }
        }
        for (&xk, row) in x1.iter().zip(w1.chunks_exact(m)) {
            for (a, &v) in out.iter_mut().zip(row) {
                *a = v.mul_add(xk, *a);
            }
        }
    }
}

multiversion! {
    /// `out[c] = dot(x, e[(j0 + c) * k..])`: entries `j0..j0 + out.len()` of `x eᵀ` for one row
    /// `x` of length `k` and a row-major `[m, k]` matrix `e`.
    fn dot_rows(x: &[f32], e: &[f32], j0: usize, out: &mut [f32]) {
        let k = x.len();
        for (c, o) in out.iter_mut().enumerate() {
            let r = &e[(j0 + c) * k..(j0 + c + 1) * k];
            let mut acc = [0.0f32; 16];
            let (xc, rc) = (x.chunks_exact(16), r.chunks_exact(16));
            let tail: f32 = xc.remainder().iter().zip(rc.remainder()).map(|(a, b)| a * b).sum();
            for (xs, rs) in xc.zip(rc) {
                for ((a, &p), &q) in acc.iter_mut().zip(xs).zip(rs) {
                    *a = p.mul_add(q, *a);
                }
            }
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// One output row `y` (`m` values) of `x w` (`w` row-major `[k, m]`): slabs of
/// [`ROWS_PER_TASK`] rows in parallel, their partial rows summed in slab order (so the result
/// does not depend on how rayon scheduled them).
fn row_times(x: &[f32], w: &[f32], y: &mut [f32]) {
    let m = y.len();
    if x.len() * m < SERIAL_MACS {
        return axpy_rows(x, w, y);
    }
    let partials: Vec<Vec<f32>> = super::team::map(x.len().div_ceil(ROWS_PER_TASK), |c| {
        let lo = c * ROWS_PER_TASK;
        let hi = (lo + ROWS_PER_TASK).min(x.len());
        let mut p = vec![0.0f32; m];
        axpy_rows(&x[lo..hi], &w[lo * m..hi * m], &mut p);
        p
    });
    for p in &partials {
        for (a, &v) in y.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// One output row `y` (`m` values) of `x eᵀ` (`e` row-major `[m, k]`), parallel over `e`'s rows.
fn row_times_transposed(x: &[f32], e: &[f32], y: &mut [f32]) {
    if x.len() * y.len() < SERIAL_MACS {
        return y
            .chunks_mut(DOTS_PER_TASK)
            .enumerate()
            .for_each(|(c, o)| dot_rows(x, e, c * DOTS_PER_TASK, o));
    }
    let parts = y.chunks_mut(DOTS_PER_TASK).enumerate().collect();
    super::team::for_each(parts, |(c, o)| dot_rows(x, e, c * DOTS_PER_TASK, o));
}

/// The flex f32 tensor behind `t` when it is contiguous and without autodiff. Unlike
/// [`flex_f32`] this never copies: a weight that is contiguous neither way is left to burn.
fn contiguous(t: &Tensor<2>) -> Option<FlexTensor> {
    if t.is_autodiff() || t.dtype() != DType::F32 {
        return None;
    }
    let ft = t.clone().try_into_primitive::<Flex>().ok()?;
    ft.is_contiguous().then_some(ft)
}

/// How a task reads one weight of [`skinny_products`].
enum Layout<'a> {
    /// Row-major `[k, m]`: slabs of rows, each a partial output row.
    Rows(&'a [f32]),
    /// The transpose of a row-major `[m, k]` matrix: blocks of output entries.
    Transposed(&'a [f32]),
}

/// A `[k, m]` fp32 weight held for [`skinny_products`]: flex's buffer itself (shared, not
/// copied), row-major or the transpose of a row-major `[m, k]` matrix.
#[derive(Debug, Clone)]
pub(crate) struct SkinnyWeight {
    data: FlexTensor,
    k: usize,
    m: usize,
    transposed: bool,
}

impl SkinnyWeight {
    /// `w` when it is a flex f32 tensor without autodiff, contiguous in either layout.
    pub(crate) fn of(w: &Tensor<2>) -> Option<Self> {
        let [k, m] = w.dims();
        let (data, transposed) = match contiguous(w) {
            Some(f) => (f, false),
            None => (contiguous(&w.clone().transpose())?, true),
        };
        Some(SkinnyWeight {
            data,
            k,
            m,
            transposed,
        })
    }

    /// Output width `m`.
    pub(crate) fn width(&self) -> usize {
        self.m
    }

    /// Row `r` of the `[m, k]` matrix whose transpose this weight is (a token's embedding,
    /// where the weight is the tied LM head); `None` for a row-major weight or `r >= m`.
    pub(crate) fn transposed_row(&self, r: usize) -> Option<&[f32]> {
        (self.transposed && r < self.m).then(|| &slice(&self.data)[r * self.k..(r + 1) * self.k])
    }

    fn layout(&self) -> Layout<'_> {
        if self.transposed {
            Layout::Transposed(slice(&self.data))
        } else {
            Layout::Rows(slice(&self.data))
        }
    }
}

/// One task of [`skinny_products`]: weight `w`, input row `r`, and the slab (rows of a
/// row-major weight) or block of outputs (a transposed one) `part`.
struct Task {
    w: usize,
    r: usize,
    part: usize,
}

/// `x w_i` for the rows `x` (`[n, k]` row-major, best for `n` up to [`SKINNY_ROWS`]) and each
/// weight of `ws` (all `k` deep), `[n, m_i]` row-major each, in one parallel region: rayon's
/// threads are woken once for the group (a decoded token's q, k and v, or gate and up) instead
/// of once per product, and the group's tasks balance over the threads together. Every
/// product is split and summed exactly as [`skinny_matmul`] does it alone, so the results are
/// the same bit for bit.
///
/// # Panics
/// When the weights are not all `k` deep (`k > 0`) or `x` is not whole rows of `k`.
pub(crate) fn skinny_products(x: &[f32], ws: &[&SkinnyWeight]) -> Vec<Vec<f32>> {
    let k = ws.first().map_or(0, |w| w.k);
    let n = x.len() / k.max(1);
    assert!(
        k > 0 && ws.iter().all(|w| w.k == k) && x.len() == n * k,
        "skinny products of {} values with weights {:?} deep",
        x.len(),
        ws.iter().map(|w| w.k).collect::<Vec<_>>()
    );
    let widths: Vec<usize> = ws.iter().map(|w| w.m).collect();
    let layouts: Vec<Layout> = ws.iter().map(|w| w.layout()).collect();
    // Rows of a row-major weight per task: all of them below SERIAL_MACS, as `row_times`
    // takes such a product in one pass.
    let slab = |m: usize| {
        if k * m < SERIAL_MACS {
            k
        } else {
            ROWS_PER_TASK
        }
    };
    let parts = |w: usize| -> usize {
        let m = widths[w];
        match layouts[w] {
            Layout::Rows(_) => k.div_ceil(slab(m)),
            Layout::Transposed(_) => m.div_ceil(DOTS_PER_TASK),
        }
    };
    let tasks: Vec<Task> = (0..ws.len())
        .flat_map(|w| (0..n).flat_map(move |r| (0..parts(w)).map(move |part| Task { w, r, part })))
        .collect();
    let results: Vec<Vec<f32>> = super::team::map(tasks.len(), |i| {
        let t = &tasks[i];
        let x = &x[t.r * k..(t.r + 1) * k];
        let m = widths[t.w];
        match layouts[t.w] {
            Layout::Rows(w) => {
                let lo = t.part * slab(m);
                let hi = (lo + slab(m)).min(k);
                let mut p = vec![0.0f32; m];
                axpy_rows(&x[lo..hi], &w[lo * m..hi * m], &mut p);
                p
            }
            Layout::Transposed(e) => {
                let j0 = t.part * DOTS_PER_TASK;
                let mut o = vec![0.0f32; DOTS_PER_TASK.min(m - j0)];
                dot_rows(x, e, j0, &mut o);
                o
            }
        }
    });
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|&m| vec![0.0f32; n * m]).collect();
    for (t, p) in tasks.iter().zip(&results) {
        let m = widths[t.w];
        let y = &mut outs[t.w][t.r * m..(t.r + 1) * m];
        match layouts[t.w] {
            Layout::Rows(_) => y.iter_mut().zip(p).for_each(|(a, &v)| *a += v),
            Layout::Transposed(_) => {
                let j0 = t.part * DOTS_PER_TASK;
                y[j0..j0 + p.len()].copy_from_slice(p);
            }
        }
    }
    outs
}

/// [`skinny_products`] of burn tensors: `None` when `x` has more than [`SKINNY_ROWS`] rows or
/// any weight does not qualify for [`skinny_matmul`] (the caller uses burn's matmul).
pub fn skinny_matmul_group(x: &Tensor<2>, ws: &[&Tensor<2>]) -> Option<Vec<Tensor<2>>> {
    let [n, k] = x.dims();
    if n == 0 || n > SKINNY_ROWS || k == 0 || ws.is_empty() {
        return None;
    }
    let held = ws
        .iter()
        .map(|w| SkinnyWeight::of(w).filter(|h| h.k == k && h.m > 0))
        .collect::<Option<Vec<_>>>()?;
    let xf = flex_f32(x)?;
    let refs: Vec<&SkinnyWeight> = held.iter().collect();
    Some(
        skinny_products(slice(&xf), &refs)
            .into_iter()
            .zip(&held)
            .map(|(v, w)| wrap(v, [n, w.m]))
            .collect(),
    )
}

/// `x w` for `x` of at most [`SKINNY_ROWS`] rows, both flex f32 tensors without autodiff, `w`
/// `[k, m]` either row-major or the transpose of a row-major `[m, k]` tensor (no copy is made
/// of `w` in either case). `None` when any of that does not hold: the caller uses burn's matmul.
pub fn skinny_matmul(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let ([n, k], [wk, m]) = (x.dims(), w.dims());
    if n == 0 || n > SKINNY_ROWS || k != wk || m == 0 {
        return None;
    }
    let xf = flex_f32(x)?;
    let xs = slice(&xf);
    let mut y = vec![0.0f32; n * m];
    if let Some(wf) = contiguous(w) {
        let ws = slice(&wf);
        for (xr, yr) in xs.chunks_exact(k).zip(y.chunks_exact_mut(m)) {
            row_times(xr, ws, yr);
        }
    } else {
        let ef = contiguous(&w.clone().transpose())?;
        let es = slice(&ef);
        for (xr, yr) in xs.chunks_exact(k).zip(y.chunks_exact_mut(m)) {
            row_times_transposed(xr, es, yr);
        }
    }
    Some(wrap(y, [n, m]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.into_data().try_to_vec().unwrap(),
            b.into_data().try_to_vec().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).fold(0.0, |m, (p, q)| m.max((p - q).abs()))
    }

    #[test]
    fn four_rows_at_once_add_in_row_order() {
        // 11 rows: two groups of four and three single rows; sums as one row at a time.
        let (k, m) = (11, 37);
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.11).cos() * 0.3).collect();
        let mut want = vec![0.5f32; m];
        for (&xk, row) in x.iter().zip(w.chunks_exact(m)) {
            for (a, &v) in want.iter_mut().zip(row) {
                *a = v.mul_add(xk, *a);
            }
        }
        let mut got = vec![0.5f32; m];
        axpy_rows(&x, &w, &mut got);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn skinny_products_match_burn_for_both_layouts_and_decline_the_rest() {
        let dev = Device::flex();
        // Widths with and without a whole last chunk, serial and parallel sizes.
        for (n, k, m) in [
            (1, 576, 1536),
            (1, 1536, 576),
            (3, 576, 200),
            (1, 40, 7),
            (4, 64, 300),
        ] {
            let x = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &dev);
            let w = Tensor::<2>::random([k, m], Distribution::Normal(0.0, 0.05), &dev);
            let got = skinny_matmul(&x, &w).expect("row-major weight");
            let d = max_diff(got, x.clone().matmul(w.clone()));
            assert!(d < 1e-4, "[{n}x{k}] x [{k}x{m}]: {d}");
            // The same product through a transposed [m, k] matrix (the tied LM head's layout).
            let e = w.clone().transpose().into_data();
            let e = Tensor::<2>::from_data(e, &dev);
            let got = skinny_matmul(&x, &e.clone().transpose()).expect("transposed weight");
            let d = max_diff(got, x.clone().matmul(w));
            assert!(d < 1e-4, "[{n}x{k}] x [{m}x{k}]ᵀ: {d}");
        }
        // The group gives each product bit for bit as alone (serial and parallel sizes, both
        // layouts, in one region).
        let x = Tensor::<2>::random([2, 576], Distribution::Normal(0.0, 1.0), &dev);
        let ws: Vec<Tensor<2>> = [1536, 192, 40]
            .iter()
            .map(|&m| Tensor::<2>::random([576, m], Distribution::Normal(0.0, 0.05), &dev))
            .collect();
        let e = Tensor::<2>::from_data(ws[0].clone().transpose().into_data(), &dev).transpose();
        let group: Vec<&Tensor<2>> = ws.iter().chain([&e]).collect();
        let got = skinny_matmul_group(&x, &group).expect("all qualify");
        for (g, w) in got.into_iter().zip(&group) {
            let alone = skinny_matmul(&x, w).expect("qualifies alone");
            let (g, a): (Vec<f32>, Vec<f32>) = (
                g.into_data().try_to_vec().unwrap(),
                alone.into_data().try_to_vec().unwrap(),
            );
            assert_eq!(
                g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        let x = Tensor::<2>::random([5, 8], Distribution::Default, &dev);
        let w = Tensor::<2>::random([8, 8], Distribution::Default, &dev);
        assert!(
            skinny_matmul(&x, &w).is_none(),
            "more rows than a decode step"
        );
        let x = Tensor::<2>::random([1, 8], Distribution::Default, &dev);
        assert!(
            skinny_matmul(&x, &w.clone().narrow(0, 0, 4)).is_none(),
            "mismatched inner size"
        );
    }
}
