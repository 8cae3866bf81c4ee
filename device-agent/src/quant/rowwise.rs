//! Int8 products with one scale per row: `out[i][j] = sa[i] * sb[j] * sum_k qa[i][k] qb[j][k]`,
//! the inner sum exact in int32, both operands quantized row by row to `-127..=127` with the
//! scale `max |row| / 127` (symmetric, round to nearest).
//!
//! What it is for: the frozen base's products in training with fewer instructions than fp32
//! fused multiply-adds. A Q8_0 block carries a scale per 32 values, so a Q8_0 product converts
//! and scales every block's partial sum (about as many instructions per 32 products as fp32's
//! four 8-lane multiply-adds: why session 30 moved prompts off the Q8_0 kernels); one scale per
//! row lets the int32 sums run over the whole row and leaves one conversion per output. Row-wise
//! scales on the activations (a token's row) and on the gradients, and a scale per weight row, are
//! how SwitchBack (Wortsman et al., 2023) runs a linear layer's forward and input-gradient
//! products in int8; a LoRA step needs no gradient of the frozen weight, so those two products
//! are all of the base's work. The forward multiplies the activations by the weight's rows along
//! its input dimension (`w^T`, one scale per output channel); the input gradient multiplies the
//! output gradient by the rows of `w` (one scale per input channel): a frozen weight is kept
//! quantized both ways ([`RowQuant::quantize_columns`]).
//!
//! Training takes them with `--precision int8` ([`crate::bf16::Precision::Int8`], opt-in: `auto`
//! never picks it): the frozen product ([`crate::bf16::FrozenBackend`]) quantizes the left
//! operand's rows per product, its largest columns kept out and multiplied in fp32 ([`product_with_outliers`]: with one scale per row alone, SmolLM2's few large activation
//! channels cost 4% in perplexity), and keeps the weight's two quantized forms in
//! [`crate::bf16::cache`]; the LM head, the LoRA factors, the optimiser and the loss stay fp32.
//! `cargo bench -p device-agent --bench sgemm -- int8` measures the products against the fp32
//! ones read in place, with their error (BENCHMARKS.md). Rows are padded with zeros to a
//! multiple of [`STEP`]; a reduced length up to [`MAX_K`] keeps every int32 sum exact.
//!
//! Paths ([`DotPath`]): AVX-512 VNNI (`vpdpbusd` on 256-bit registers, the left operand offset
//! to unsigned by `x ^ 0x80` and the right rows' sums correcting it), AVX2 (`maddubs` + `madd`
//! with the sign trick `|a| * (b * sign(a))`, exact because no value is `-128`), aarch64's
//! `sdot` (FEAT_DotProd: Cortex-A76 and later; signed by signed), and a portable loop for the
//! rest (aarch64 cores without it included, vectorised by the compiler).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused, unused_unsafe))]

use rayon::prelude::*;

use crate::cpu::DotPath;
use crate::kernels::OutPtr;

mod tiles;

/// Row padding: every kernel steps through a row 32 or 64 values at a time.
pub const STEP: usize = 64;

/// The longest reduced dimension whose sums stay exact in int32 on every path (the VNNI path
/// sums `(a + 128) * b`, at most `255 * 127` per value).
pub const MAX_K: usize = 65_536;

/// Rows of the left operand per kernel tile.
const MR: usize = 4;
/// Rows of the right operand per kernel tile.
const NR: usize = 4;
/// Rows of the left operand one task takes (a multiple of [`MR`]).
const A_BLOCK: usize = 64;
/// Rows of the right operand one task takes (a multiple of [`NR`]).
const B_BLOCK: usize = 32;
/// Rows quantized per task.
const QUANT_ROWS: usize = 16;
/// Values from which quantizing splits rows across threads: a micro-batch's activations
/// (about 100 rows of 576) take a few microseconds on one thread, less than waking the pool.
const PARALLEL_VALUES: usize = 1 << 17;
/// Columns one task of [`RowQuant::quantize_columns`] copies out.
const COL_BLOCK: usize = 32;

/// A matrix quantized row by row: the value at `(r, k)` is `scale[r] * q[r * stride + k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowQuant {
    rows: usize,
    k: usize,
    stride: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    /// `sum_k q[r][k]` per row: the VNNI path's correction when this is the right operand.
    sums: Vec<i32>,
}

/// One quantizing task's share: its index, and its rows' values, scales and sums.
type RowsTask<'a> = (usize, ((&'a mut [i8], &'a mut [f32]), &'a mut [i32]));

/// Quantize one row into `q` (as long as `row`); returns the scale and the values' sum. Written
/// so the loops vectorise: the rounding adds and subtracts `1.5 * 2^23` (to nearest, ties to
/// even) and reads the integer from the sum's bits, since a float-to-int cast saturates lane by
/// lane.
fn quantize_row(row: &[f32], q: &mut [i8]) -> (f32, i32) {
    const ROUND: f32 = 12_582_912.0;
    debug_assert_eq!(row.len(), q.len());
    let max = f32::from_bits(row.iter().fold(0, |m, v| m.max(magnitude(*v))));
    if max == 0.0 || !max.is_finite() {
        // A zero row is exact; a row holding inf or NaN has no finite scale: zeros, and the
        // scale carries the NaN into every product it touches.
        q.fill(0);
        return (if max == 0.0 { 0.0 } else { f32::NAN }, 0);
    }
    let inv = 127.0 / max;
    if !inv.is_finite() {
        // A row of values so small that `127 / max` overflows: scaled in f64 instead (rare;
        // scalar).
        let inv = 127.0 / f64::from(max);
        for (d, &v) in q.iter_mut().zip(row) {
            *d = (f64::from(v) * inv).round().clamp(-127.0, 127.0) as i8;
        }
        let sum = q.iter().map(|&v| i32::from(v)).sum();
        return (max / 127.0, sum);
    }
    for (d, &v) in q.iter_mut().zip(row) {
        let t = (v * inv).clamp(-127.0, 127.0) + ROUND;
        *d = t.to_bits().wrapping_sub(ROUND.to_bits()) as i8;
    }
    let sum = q.iter().map(|&v| i32::from(v)).sum();
    (max / 127.0, sum)
}

impl RowQuant {
    /// `x` is `rows x k`, row-major.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> RowQuant {
        assert_eq!(
            x.len(),
            rows * k,
            "RowQuant::quantize: {rows} x {k} needs {} values",
            rows * k
        );
        Self::build(rows, k, |r, q| quantize_row(&x[r * k..(r + 1) * k], q))
    }

    /// The columns of `w` (`rows_w x cols_w`, row-major) as rows: `w^T` quantized row by row,
    /// one scale per column of `w`.
    pub fn quantize_columns(w: &[f32], rows_w: usize, cols_w: usize) -> RowQuant {
        assert_eq!(
            w.len(),
            rows_w * cols_w,
            "RowQuant::quantize_columns: length"
        );
        // Blocks of columns copied out row by row (contiguous reads), then quantized as rows.
        let mut t = vec![0f32; rows_w * cols_w];
        t.par_chunks_mut(COL_BLOCK * rows_w.max(1))
            .enumerate()
            .for_each(|(blk, out)| {
                let c0 = blk * COL_BLOCK;
                let width = out.len() / rows_w.max(1);
                for (r, src) in w.chunks_exact(cols_w.max(1)).enumerate() {
                    for (c, &v) in src[c0..c0 + width].iter().enumerate() {
                        out[c * rows_w + r] = v;
                    }
                }
            });
        Self::build(cols_w, rows_w, |c, q| {
            quantize_row(&t[c * rows_w..(c + 1) * rows_w], q)
        })
    }

    /// `rows` rows of `k` values, `row(r, q)` quantizing row `r` into `q` (`k` long).
    fn build(
        rows: usize,
        k: usize,
        row: impl Fn(usize, &mut [i8]) -> (f32, i32) + Sync,
    ) -> RowQuant {
        assert!(
            k <= MAX_K,
            "RowQuant: a reduced length of {k} is over {MAX_K}"
        );
        let stride = k.div_ceil(STEP).max(1) * STEP;
        let mut q = vec![0i8; rows * stride];
        let mut scale = vec![0f32; rows];
        let mut sums = vec![0i32; rows];
        let task = |(t, ((q, scale), sums)): RowsTask| {
            for (i, (qr, (s, sum))) in q
                .chunks_mut(stride)
                .zip(scale.iter_mut().zip(sums.iter_mut()))
                .enumerate()
            {
                (*s, *sum) = row(t * QUANT_ROWS + i, &mut qr[..k]);
            }
        };
        if rows * k >= PARALLEL_VALUES {
            q.par_chunks_mut(QUANT_ROWS * stride)
                .zip(scale.par_chunks_mut(QUANT_ROWS))
                .zip(sums.par_chunks_mut(QUANT_ROWS))
                .enumerate()
                .for_each(task);
        } else {
            q.chunks_mut(QUANT_ROWS * stride)
                .zip(scale.chunks_mut(QUANT_ROWS))
                .zip(sums.chunks_mut(QUANT_ROWS))
                .enumerate()
                .for_each(task);
        }
        RowQuant {
            rows,
            k,
            stride,
            q,
            scale,
            sums,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The reduced length (values per row, padding excluded).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The values back in fp32, `rows x k`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(&(0..self.rows).collect::<Vec<_>>())
    }

    /// The rows `which` back in fp32, `which.len() x k`.
    pub fn dequantize_rows(&self, which: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(which.len() * self.k);
        for &r in which {
            let (q, s) = (
                &self.q[r * self.stride..r * self.stride + self.k],
                self.scale[r],
            );
            out.extend(q.iter().map(|&v| s * f32::from(v)));
        }
        out
    }

    /// Bytes held (values with their padding, scales, sums).
    pub fn bytes(&self) -> usize {
        self.q.len() + 8 * self.rows
    }
}

/// The most columns of a left operand kept out of its int8 rows ([`product_with_outliers`]).
pub const OUTLIERS: usize = 32;

/// How many of a left operand's `k` columns go the fp32 way: [`OUTLIERS`], or an eighth of
/// `k` when that is fewer (a 192-wide gradient keeps 24).
pub fn outlier_count(k: usize) -> usize {
    (k / 8).min(OUTLIERS)
}

/// The columns of `x` (`rows x k`, row-major) with the `count` largest magnitudes, ascending
/// (ties to the lower index; all of them when `k <= count`). A column holding NaN ranks first.
pub fn outlier_columns(x: &[f32], rows: usize, k: usize, count: usize) -> Vec<usize> {
    assert_eq!(x.len(), rows * k, "outlier_columns: {rows} x {k}");
    let mut max = vec![0u32; k];
    for row in x.chunks_exact(k.max(1)) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = (*m).max(magnitude(v));
        }
    }
    let mut cols: Vec<usize> = (0..k).collect();
    if k > count {
        // A total order (magnitude down, then index up), so the choice is the same on every run.
        cols.select_nth_unstable_by(count, |a, b| max[*b].cmp(&max[*a]).then(a.cmp(b)));
        cols.truncate(count);
    }
    cols.sort_unstable();
    cols
}

/// `x` (`m x k`) times `b`'s rows, the [`outlier_count`] columns of `x` with the largest
/// magnitudes taken in fp32 and the rest as int8 rows (LLM.int8's decomposition, Dettmers et
/// al. 2022): a language model's activations and gradients carry a few channels tens of times
/// larger than the rest, and with one scale per row those few set the scale and round the rest
/// coarsely. Kept out, they leave the rows' scales to the other columns; on SmolLM2's own
/// activations this cuts a forward product's error from 2-5% to about 1%. `weights(cols)` gives,
/// for each of `cols`, the `n` weights that column meets, `cols.len() x n` row-major. Columns
/// are chosen from `x` alone, so the result is a function of the operands.
pub fn product_with_outliers(
    path: DotPath,
    x: &[f32],
    m: usize,
    b: &RowQuant,
    weights: impl FnOnce(&[usize]) -> Vec<f32>,
) -> Vec<f32> {
    let (k, n) = (b.k, b.rows);
    assert_eq!(
        x.len(),
        m * k,
        "product_with_outliers: {m} x {k} needs {} values",
        m * k
    );
    let count = outlier_count(k);
    if count == 0 || m == 0 || n == 0 {
        return product(path, &RowQuant::quantize(x, m, k), b);
    }
    let cols = outlier_columns(x, m, k, count);
    let a = RowQuant::build(m, k, |r, q| {
        let mut row = x[r * k..(r + 1) * k].to_vec();
        for &c in &cols {
            row[c] = 0.0;
        }
        quantize_row(&row, q)
    });
    let w = weights(&cols);
    assert_eq!(w.len(), cols.len() * n, "product_with_outliers: weights");
    // The fp32 share first, `x[:, cols] w` (`m x count` by `count x n`), on this CPU's fp32
    // kernel where it has one; the int8 share is added to it.
    let xo: Vec<f32> = x
        .chunks_exact(k)
        .flat_map(|r| cols.iter().map(move |&c| r[c]))
        .collect();
    let count = cols.len();
    let mut out = match crate::kernels::sgemm::Kernel::detect() {
        Some(kernel) => crate::kernels::sgemm::product_on(
            kernel,
            &xo,
            m,
            &w,
            count,
            n,
            crate::kernels::Layout::Plain,
        ),
        None => share_portable(&xo, m, &w, n),
    };
    add_product(path, &a, b, &mut out);
    out
}

/// The fp32 share where this CPU has no [`crate::kernels::sgemm`] kernel (aarch64): `x w`, `x`
/// `m x count`, `w` `count x n`, each output a chain of fused multiply-adds in the order of the
/// reduced index from zero, which is what the sgemm kernels compute for a reduced length within
/// one panel (`count` is at most [`OUTLIERS`]), so both give the same bits. That matters more
/// than it would in fp32: a one-ulp difference here can move a value of the next product across
/// an int8 rounding boundary or change which columns are its outliers, and with a plain multiply
/// and add this loop moved the first loss of a 2-step `tune --precision int8` by 0.0025 nats
/// (where fp32's whole forward differed between x86 and the portable kernels by 2e-6).
fn share_portable(x: &[f32], m: usize, w: &[f32], n: usize) -> Vec<f32> {
    let count = x.len().checked_div(m).unwrap_or(0);
    let mut out = vec![0f32; m * n];
    if count == 0 {
        return out;
    }
    for (o, xr) in out.chunks_mut(n).zip(x.chunks_exact(count)) {
        for (&v, w) in xr.iter().zip(w.chunks_exact(n)) {
            for (d, &wv) in o.iter_mut().zip(w) {
                *d = v.mul_add(wv, *d);
            }
        }
    }
    out
}

/// `|v|`'s bits: ordered as the magnitudes are, with NaN above infinity, so an integer maximum
/// (which vectorises, where a float one that keeps NaN does not) finds the largest and keeps NaN.
#[inline]
fn magnitude(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// `a` (`m` rows) times `b` (`n` rows) along their rows: `m x n` row-major, on `path` where
/// this CPU runs it (the portable loop elsewhere). Each output's int32 sum is exact, so every
/// path gives the same bits.
pub fn product(path: DotPath, a: &RowQuant, b: &RowQuant) -> Vec<f32> {
    let mut out = vec![0f32; a.rows * b.rows];
    add_product(path, a, b, &mut out);
    out
}

/// [`product`] added to `out` (`m x n`, row-major).
#[allow(unsafe_code)]
pub fn add_product(path: DotPath, a: &RowQuant, b: &RowQuant, out: &mut [f32]) {
    assert_eq!(
        a.k, b.k,
        "int8 row product: reduced lengths {} and {} differ",
        a.k, b.k
    );
    let (m, n, stride) = (a.rows, b.rows, a.stride);
    debug_assert_eq!(a.stride, b.stride);
    assert_eq!(out.len(), m * n, "int8 row product: output of {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    let path = if path.runs_here() {
        path
    } else {
        DotPath::Portable
    };
    let dst = OutPtr::new(out.as_mut_ptr());
    let (a_blocks, b_blocks) = (m.div_ceil(A_BLOCK), n.div_ceil(B_BLOCK));
    // Each task: a block of `a`'s rows against a block of `b`'s, the `b` block (at most 32 rows
    // of a reduced length of a few thousand bytes) staying in L1 or L2 while `a`'s rows pass.
    (0..a_blocks * b_blocks).into_par_iter().for_each(|task| {
        let (i_lo, j_lo) = (task / b_blocks * A_BLOCK, task % b_blocks * B_BLOCK);
        let (i_hi, j_hi) = ((i_lo + A_BLOCK).min(m), (j_lo + B_BLOCK).min(n));
        for i0 in (i_lo..i_hi).step_by(MR) {
            let ra: [&[i8]; MR] = std::array::from_fn(|t| {
                let r = if i0 + t < i_hi { i0 + t } else { i0 };
                &a.q[r * stride..(r + 1) * stride]
            });
            for j0 in (j_lo..j_hi).step_by(NR) {
                let rb: [&[i8]; NR] = std::array::from_fn(|t| {
                    let r = if j0 + t < j_hi { j0 + t } else { j0 };
                    &b.q[r * stride..(r + 1) * stride]
                });
                // SAFETY: `path` runs here (checked above, else Portable); every row slice is
                // `stride` long, a multiple of `STEP`.
                let tile = unsafe { tiles::tile(path, ra, rb) };
                for (i, row) in (i0..i_hi).zip(&tile) {
                    for (j, &s) in (j0..j_hi).zip(row) {
                        // The VNNI tile summed (a + 128) * b.
                        let s = if path == DotPath::Avx512Vnni {
                            s - 128 * b.sums[j]
                        } else {
                            s
                        };
                        // SAFETY: cell (i, j) lies in this task's rows and columns, which no
                        // other task has; `out` outlives the loop.
                        unsafe { *dst.at(i * n + j) += a.scale[i] * b.scale[j] * s as f32 };
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // A spread of magnitudes, with a few large entries as activations have.
        (0..n)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                let u = (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if h.is_multiple_of(97) {
                    u * 20.0
                } else {
                    u
                }
            })
            .collect()
    }

    fn paths() -> Vec<DotPath> {
        [
            DotPath::Portable,
            DotPath::Avx2,
            DotPath::Avx512Vnni,
            DotPath::NeonDot,
        ]
        .into_iter()
        .filter(|p| p.runs_here())
        .collect()
    }

    #[test]
    fn every_path_gives_the_exact_integer_products() {
        // Shapes with ragged tiles on both sides and a pruned, unpadded reduced length.
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 33), (9, 70, 576), (13, 33, 1075)] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let (a, b) = (RowQuant::quantize(&x, m, k), RowQuant::quantize(&w, n, k));
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let s: i64 = (0..k)
                        .map(|t| {
                            i64::from(a.q[i * a.stride + t]) * i64::from(b.q[j * b.stride + t])
                        })
                        .sum();
                    want[i * n + j] = a.scale[i] * b.scale[j] * s as f32;
                }
            }
            for p in paths() {
                assert_eq!(product(p, &a, &b), want, "{p:?} at {m} x {n} x {k}");
            }
        }
    }

    #[test]
    fn the_product_is_close_to_fp32() {
        let (m, n, k) = (16, 48, 576);
        let (x, w) = (values(m * k, 3), values(n * k, 4));
        let got = product(
            DotPath::detect(),
            &RowQuant::quantize(&x, m, k),
            &RowQuant::quantize(&w, n, k),
        );
        let rel = distance(&got, &x, &w, (m, n, k));
        // Row-wise int8 with outliers at 20x the bulk: a few percent, not more.
        assert!(rel < 0.05, "relative error {rel}");
    }

    /// The relative Frobenius distance of `got` (`m x n`) from `x w^T` in f64, `w` `n x k`.
    fn distance(got: &[f32], x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) -> f64 {
        let (mut err, mut norm) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                    .sum();
                err += (f64::from(got[i * n + j]) - r).powi(2);
                norm += r * r;
            }
        }
        (err / norm).sqrt()
    }

    #[test]
    fn outlier_columns_are_the_largest_in_a_fixed_order() {
        let (m, k) = (3, 40);
        let mut x = vec![0.5f32; m * k];
        x[2 * k + 7] = -9.0;
        x[11] = 4.0;
        x[k + 30] = -4.0;
        assert_eq!(outlier_columns(&x, m, k, 3), [7, 11, 30]);
        // A tie goes to the lower index, on every run.
        assert_eq!(outlier_columns(&x, m, k, 2), [7, 11]);
        // A column holding NaN goes first (to fp32, where the NaN stays a NaN).
        x[k + 20] = f32::NAN;
        assert_eq!(outlier_columns(&x, m, k, 1), [20]);
        assert_eq!(outlier_columns(&x[..8], 2, 4, 5), [0, 1, 2, 3]);
        assert_eq!(
            [
                outlier_count(1536),
                outlier_count(576),
                outlier_count(192),
                outlier_count(7)
            ],
            [32, 32, 24, 0]
        );
    }

    #[test]
    fn outlier_columns_go_the_fp32_way() {
        // Eight channels at 60x the rest, as a language model's activations carry a few.
        let (m, n, k) = (24, 40, 576);
        let mut x = values(m * k, 5);
        for row in x.chunks_mut(k) {
            for c in [3, 77, 140, 300, 301, 450, 511, 575] {
                row[c] *= 60.0;
            }
        }
        let w = values(n * k, 6);
        let b = RowQuant::quantize(&w, n, k);
        let w = &w;
        let gather = |cols: &[usize]| -> Vec<f32> {
            cols.iter()
                .flat_map(|&c| (0..n).map(move |j| w[j * k + c]))
                .collect()
        };
        let path = DotPath::detect();
        let split = product_with_outliers(path, &x, m, &b, gather);
        let plain = product(path, &RowQuant::quantize(&x, m, k), &b);
        let (es, ep) = (
            distance(&split, &x, w, (m, n, k)),
            distance(&plain, &x, w, (m, n, k)),
        );
        assert!(
            es < 0.02 && ep > 3.0 * es,
            "with outlier columns {es}, without {ep}"
        );
        // Only outlier columns nonzero: the int8 share is zero and the product is fp32's.
        let mut sparse = vec![0f32; m * k];
        for (r, row) in sparse.chunks_mut(k).enumerate() {
            for c in [5, 99, 400] {
                row[c] = r as f32 - 7.5 + c as f32 / 100.0;
            }
        }
        let exact = product_with_outliers(path, &sparse, m, &b, gather);
        let e = distance(&exact, &sparse, w, (m, n, k));
        assert!(e < 1e-6, "fp32 share alone: {e}");
        // A NaN in a row reaches that row's outputs and no other.
        let mut bad = x.clone();
        bad[k + 200] = f32::NAN;
        let out = product_with_outliers(path, &bad, m, &b, gather);
        assert!(out[n..2 * n].iter().all(|v| v.is_nan()));
        assert!(out[..n].iter().chain(&out[2 * n..]).all(|v| v.is_finite()));
    }

    /// As a frozen product under autodiff (`Precision::Int8`): the forward is `x`'s rows against
    /// the weight's columns, the input gradient `dy`'s rows against the weight's rows, each
    /// exactly this module's product.
    #[test]
    fn the_frozen_product_and_its_input_gradient_are_these_products() {
        use burn::tensor::{Device, Tensor, TensorData};
        let device = Device::flex().autodiff();
        let (n, k, out) = (9, 70, 37);
        let (xv, wv, gv) = (values(n * k, 6), values(k * out, 7), values(n * out, 8));
        let w = Tensor::<2>::from_data(TensorData::new(wv.clone(), [k, out]), &device);
        let x = Tensor::<2>::from_data(TensorData::new(xv.clone(), [n, k]), &device).require_grad();
        let g = Tensor::<2>::from_data(TensorData::new(gv.clone(), [n, out]), &device);
        let y = crate::bf16::matmul_int8(x.clone(), &w).expect("flex f32");
        let dx = x.grad(&(y.clone() * g).sum().backward()).unwrap();
        let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let path = DotPath::detect();
        // The forward's outlier columns meet rows of `w` (in fp32); the gradient's meet columns
        // of `w`, read from its other int8 form.
        let columns = RowQuant::quantize_columns(&wv, k, out);
        let want_y = product_with_outliers(path, &xv, n, &columns, |cols| {
            cols.iter()
                .flat_map(|&c| &wv[c * out..(c + 1) * out])
                .copied()
                .collect()
        });
        let want_dx =
            product_with_outliers(path, &gv, n, &RowQuant::quantize(&wv, k, out), |cols| {
                columns.dequantize_rows(cols)
            });
        assert_eq!(v(y), want_y);
        assert_eq!(dx.into_data().try_to_vec::<f32>().unwrap(), want_dx);
    }

    /// The fp32 share gives the same bits on every x86 kernel and on the portable loop that
    /// aarch64 runs, so `--precision int8` trains alike on both architectures.
    #[test]
    fn the_fp32_share_is_the_same_on_every_kernel() {
        for (m, count, n) in [(1, 32, 576), (37, 32, 192), (112, 24, 1536), (5, 3, 40)] {
            let (x, w) = (values(m * count, 9), values(count * n, 10));
            let want = share_portable(&x, m, &w, n);
            for kernel in crate::kernels::sgemm::Kernel::all_usable() {
                let got = crate::kernels::sgemm::product_on(
                    kernel,
                    &x,
                    m,
                    &w,
                    count,
                    n,
                    crate::kernels::Layout::Plain,
                );
                assert_eq!(got, want, "{kernel:?} at {m} x {count} x {n}");
            }
        }
    }

    #[test]
    fn columns_quantize_as_the_transpose_does() {
        let (r, c) = (37, 70);
        let w = values(r * c, 5);
        let t: Vec<f32> = (0..c)
            .flat_map(|j| (0..r).map(move |i| (i, j)))
            .map(|(i, j)| w[i * c + j])
            .collect();
        assert_eq!(
            RowQuant::quantize_columns(&w, r, c),
            RowQuant::quantize(&t, c, r)
        );
    }

    #[test]
    fn a_row_round_trips_within_half_a_step_and_bad_rows_are_flagged() {
        let x = [
            0.0,
            1.0,
            -2.0,
            0.5,
            127.0,
            -127.0,
            0.0,
            0.0,
            f32::INFINITY,
            1.0,
            0.0,
            0.0,
        ];
        let q = RowQuant::quantize(&x, 3, 4);
        let back = q.dequantize();
        for (a, b) in x[..4].iter().zip(&back[..4]) {
            assert!((a - b).abs() <= 2.0 / 127.0 / 2.0 + 1e-6, "{a} -> {b}");
        }
        assert_eq!(&back[4..8], &x[4..8]);
        assert!(
            back[8..].iter().all(|v| v.is_nan()),
            "a row with inf has no scale"
        );
        // NaN likewise (a float maximum would pass over it and quantize the rest).
        let nan = RowQuant::quantize(&[1.0, f32::NAN, -3.0, 0.5], 1, 4);
        assert!(nan.scale[0].is_nan() && nan.dequantize().iter().all(|v| v.is_nan()));
        // Subnormal values: `127 / max` overflows in f32; the row still keeps its shape.
        let tiny = [1e-39f32, -5e-40, 0.0, 2.5e-40];
        let t = RowQuant::quantize(&tiny, 1, 4);
        assert_eq!(&t.q[..4], &[127, -64, 0, 32]);
        assert!(t.scale[0] > 0.0 && t.scale[0].is_finite());
        assert_eq!(q.k(), 4);
        assert_eq!(q.rows(), 3);
    }
}
