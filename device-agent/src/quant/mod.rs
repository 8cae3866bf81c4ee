//! A frozen base kept quantized in memory (`--base-precision q8_0`, for `generate`, `eval` and
//! `tune` ([`frozen`]);
//! a model takes it on through `Llama::set_base_precision`): GGUF's Q8_0 blocks (32 int8 values sharing one f16 scale, running along the *input*
//! dimension of each output row) and a matmul that multiplies from them, quantizing the
//! activations' rows to Q8_0 blocks too and summing int8 products exactly in int32
//! ([`kernels`]: AVX-512 VNNI, AVX2, aarch64 `sdot`, portable; chosen at run time by
//! [`crate::cpu::DotPath`]).
//! Output rows are split across rayon's threads, so one decoded token pulls the weights through
//! every core.
//!
//! The block's quantization rule ([`quantize_block`]) is the one the GGUF writer uses, so a
//! Q8_0 file read back and quantized again gives the same blocks. Blocks are stored as two
//! arrays (values, then scales) rather than interleaved 34-byte records; the content is the
//! same. An input dimension that is not a multiple of 32 (a pruned MLP) pads its last block
//! with zeros. Slicing: output rows can be dropped freely; input columns only by whole
//! 32-blocks, so a pruned model is sliced in fp32 first and quantized afterwards.
//!
//! The LoRA path stays fp32 and is added on top (QLoRA style). Training takes its products
//! from the dequantized weights instead ([`frozen`], with an input gradient), and a pruned
//! block is sliced in fp32 and quantized again (`Llama::set_block`).

mod base;
pub mod frozen;
pub mod kernels;

pub use base::QuantBase;

use std::sync::OnceLock;

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::cpu::DotPath;
use kernels::{RowArgs, QK};

/// Errors of the quantized base.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{what}: {got} values, expected {expected}")]
    Shape {
        what: String,
        got: usize,
        expected: usize,
    },
    #[error("unknown base precision '{0}' (f32, q8_0)")]
    UnknownPrecision(String),
    #[error("int8 products from a Q8_0 base have no backward pass: training takes its products from the dequantized weights (Q8Arithmetic::Fp32)")]
    Tracked,
}

/// How the frozen base's projections are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasePrecision {
    #[default]
    F32,
    Q8_0,
}

/// How products from a Q8_0 base are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Q8Arithmetic {
    /// Serving (`generate`, `eval`): the activations are quantized to Q8_0 too and the block
    /// sums are exact int8 dot products ([`kernels`]).
    #[default]
    Int8,
    /// Training (`tune`): fp32 products of the activations with the dequantized weight, one
    /// matrix at a time, with an input gradient ([`frozen`]: QLoRA's arithmetic).
    Fp32,
}

impl std::str::FromStr for BasePrecision {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(BasePrecision::F32),
            "q8_0" | "q8" => Ok(BasePrecision::Q8_0),
            _ => Err(QuantError::UnknownPrecision(s.to_string())),
        }
    }
}

/// Quantize up to 32 values (missing ones count as 0) to one Q8_0 block: `d = max|v| / 127`,
/// `q = round(v / d)` clamped to `-127..=127`. Returns `d` in f32 (the GGUF block stores it as
/// f16). The one definition of the block rule (the GGUF writer calls it too).
pub fn quantize_block(values: &[f32], q: &mut [i8; QK]) -> f32 {
    let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let whole_finite = values
        .first_chunk::<QK>()
        .filter(|b| b.iter().all(|v| v.is_finite()));
    if let Some(block) = whole_finite {
        // A whole block of finite values: every `v * inv` is finite with magnitude at most
        // about 127, so truncation needs no saturation check, and the loop vectorises.
        for (qi, &v) in q.iter_mut().zip(block) {
            let x = v * inv;
            #[allow(unsafe_code)]
            // SAFETY: `x` is finite (every `v` is, so `amax`, `d` and `inv` are) and `|x| <= |v|
            // / d <= 127` up to rounding, far inside `i32`'s range.
            let t = unsafe { x.to_int_unchecked::<i32>() } as f32;
            let r = if (x - t).abs() >= 0.5 {
                t + 1f32.copysign(x)
            } else {
                t
            };
            *qi = r.clamp(-127.0, 127.0) as i32 as i8;
        }
        return d;
    }
    for (i, qi) in q.iter_mut().enumerate() {
        let v = values.get(i).copied().unwrap_or(0.0);
        *qi = round_half_away(v * inv).clamp(-127.0, 127.0) as i8;
    }
    d
}

/// `x.round()` (halves away from zero) for `|x| < 2^31`, without the C library's `roundf`
/// call per value, so a block's loop vectorises: truncation through `i32` is exact there and
/// so is the remainder `x - t`.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x as i32 as f32;
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// The f16 -> f32 table (256 KiB), built once.
fn f16_table() -> &'static [f32; 65536] {
    static TAB: OnceLock<Box<[f32; 65536]>> = OnceLock::new();
    TAB.get_or_init(|| {
        let mut t = Box::new([0f32; 65536]);
        for (i, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(i as u16).to_f32();
        }
        t
    })
}

/// A `[rows, cols]` matrix in Q8_0 blocks along `cols` (for a projection: rows = outputs,
/// cols = inputs).
#[derive(Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Blocks per row, `ceil(cols / 32)`.
    nb: usize,
    /// `rows * nb * 32` values, each in `-127..=127`.
    qs: Vec<i8>,
    /// `rows * nb` f16 scales (bits).
    d: Vec<u16>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix[{} x {}]", self.rows, self.cols)
    }
}

/// Activation rows quantized to Q8_0 blocks (scales kept in f32).
pub struct QRows {
    n: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
}

impl QRows {
    /// Quantize `n` rows of `cols` values (row-major `x`).
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> Result<QRows, QuantError> {
        if x.len() != n * cols {
            return Err(QuantError::Shape {
                what: format!("activations [{n}, {cols}]"),
                got: x.len(),
                expected: n * cols,
            });
        }
        let nb = cols.div_ceil(QK);
        let mut qs = vec![0i8; n * nb * QK];
        let mut d = vec![0f32; n * nb];
        let work = |(r, (q, dr)): (usize, (&mut [i8], &mut [f32]))| {
            let row = &x[r * cols..(r + 1) * cols];
            for (b, (qb, db)) in q.chunks_exact_mut(QK).zip(dr.iter_mut()).enumerate() {
                let end = ((b + 1) * QK).min(cols);
                let qb: &mut [i8; QK] = qb.try_into().expect("chunks of QK");
                *db = quantize_block(&row[b * QK..end], qb);
            }
        };
        if n * cols >= 1 << 16 && nb > 0 {
            qs.par_chunks_mut(nb * QK)
                .zip(d.par_chunks_mut(nb))
                .enumerate()
                .for_each(work);
        } else if nb > 0 {
            qs.chunks_mut(nb * QK)
                .zip(d.chunks_mut(nb))
                .enumerate()
                .for_each(work);
        }
        Ok(QRows { n, nb, qs, d })
    }
}

impl Q8Matrix {
    /// Quantize a row-major `[rows, cols]` matrix.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Q8Matrix, QuantError> {
        if values.len() != rows * cols {
            return Err(QuantError::Shape {
                what: format!("matrix [{rows}, {cols}]"),
                got: values.len(),
                expected: rows * cols,
            });
        }
        let nb = cols.div_ceil(QK);
        let mut qs = vec![0i8; rows * nb * QK];
        let mut d = vec![0u16; rows * nb];
        if nb > 0 {
            qs.par_chunks_mut(nb * QK)
                .zip(d.par_chunks_mut(nb))
                .enumerate()
                .for_each(|(r, (q, dr))| {
                    let row = &values[r * cols..(r + 1) * cols];
                    for (b, (qb, db)) in q.chunks_exact_mut(QK).zip(dr.iter_mut()).enumerate() {
                        let end = ((b + 1) * QK).min(cols);
                        let qb: &mut [i8; QK] = qb.try_into().expect("chunks of QK");
                        *db = half::f16::from_f32(quantize_block(&row[b * QK..end], qb)).to_bits();
                    }
                });
        }
        Ok(Q8Matrix {
            rows,
            cols,
            nb,
            qs,
            d,
        })
    }

    /// Quantize a projection held as burn holds it, `[in, out]`: rows become the outputs.
    pub fn from_in_out(w: Tensor<2>) -> Result<Q8Matrix, QuantError> {
        let [i, o] = w.dims();
        Self::from_rows(w.transpose(), o, i)
    }

    /// Quantize a `[rows, cols]` tensor as it is.
    pub fn from_rows(w: Tensor<2>, rows: usize, cols: usize) -> Result<Q8Matrix, QuantError> {
        let v: Vec<f32> =
            w.into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|_| QuantError::Shape {
                    what: "weights (not convertible to f32)".into(),
                    got: 0,
                    expected: rows * cols,
                })?;
        Self::quantize(&v, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held (values and f16 scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.d.len()
    }

    /// Row `r` dequantized (`cols` values).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let tab = f16_table();
        let q = &self.qs[r * self.nb * QK..(r + 1) * self.nb * QK];
        let d = &self.d[r * self.nb..(r + 1) * self.nb];
        q.iter()
            .enumerate()
            .take(self.cols)
            .map(|(k, &v)| v as f32 * tab[d[k / QK] as usize])
            .collect()
    }

    /// `y[n, rows] = x[n, cols] · selfᵀ` on the path this process detected.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>, QuantError> {
        self.matmul_with(DotPath::detect(), x, n)
    }

    /// As [`Self::matmul`] on a chosen dot path (paths the CPU lacks fall back to portable).
    pub fn matmul_with(&self, path: DotPath, x: &[f32], n: usize) -> Result<Vec<f32>, QuantError> {
        let qx = QRows::quantize(x, n, self.cols)?;
        Ok(self.matmul_q(path, &qx))
    }

    /// The matmul from already quantized activations (`qx` has this matrix's block count).
    pub fn matmul_q(&self, path: DotPath, qx: &QRows) -> Vec<f32> {
        matmul_many_q(path, &[self], qx)
            .pop()
            .expect("one product per matrix")
    }
}

/// Several matrices times the same quantized activations (`qx` has their block count), `y[n,
/// rows]` each. Their weight rows are split over the pool together: a decoded token's k and v
/// products are each too small to split (a task per thread would cost more than it saves), so
/// taken one by one they ran on one thread after q; together they run beside it. Every output
/// is one weight row's dot products, whichever task computes it, so the split never changes a
/// value.
pub fn matmul_many_q(path: DotPath, mats: &[&Q8Matrix], qx: &QRows) -> Vec<Vec<f32>> {
    let n = qx.n;
    for m in mats {
        assert_eq!(qx.nb, m.nb, "activations quantized for another width");
    }
    let tab = f16_table();
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.rows * n]).collect();
    if n == 0 {
        return outs;
    }
    // Weight rows `j0..j0 + y.len() / n` of `m` into `y` (their outputs for every activation
    // row).
    let rows = |m: &Q8Matrix, j0: usize, y: &mut [f32]| {
        let nb = m.nb;
        let j1 = j0 + y.len() / n;
        let a = RowArgs {
            nb,
            qw: &m.qs[j0 * nb * QK..j1 * nb * QK],
            dw: &m.d[j0 * nb..j1 * nb],
            qx: &qx.qs,
            dx: &qx.d,
            tab,
        };
        kernels::row_dots(path, &a, y);
    };
    let macs: usize = mats.iter().map(|m| m.rows * n * m.nb * QK).sum();
    if macs < 1 << 18 {
        for (m, y) in mats.iter().zip(outs.iter_mut()) {
            rows(m, 0, y);
        }
    } else {
        let threads = rayon::current_num_threads().max(1);
        let total: usize = mats.iter().map(|m| m.rows).sum();
        let per_task = total.div_ceil(threads * 8).max(1);
        let mut tasks: Vec<(&Q8Matrix, usize, &mut [f32])> = Vec::new();
        for (m, y) in mats.iter().zip(outs.iter_mut()) {
            for (c, ys) in y.chunks_mut(per_task * n).enumerate() {
                tasks.push((m, c * per_task, ys));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(m, j0, ys)| rows(m, j0, ys));
    }
    if n == 1 {
        return outs;
    }
    // Each task wrote its rows' outputs for every activation row; `y` is `[n, rows]`.
    outs.into_iter()
        .zip(mats)
        .map(|(yt, m)| transposed(&yt, m.rows, n))
        .collect()
}

/// `[cols, rows]` of a row-major `[rows, cols]` matrix in 32 x 32 tiles, each copied through a
/// local buffer: the strides on both sides are often multiples of 4 KiB (the LM head's
/// `[49152, 256]` outputs of a scored window), where walking either side element by element
/// maps every access to one cache set; that naive loop took a tenth of an evaluation. Bands of
/// 32 output rows run in parallel.
fn transposed(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut t = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return t;
    }
    let band = |(b, tb): (usize, &mut [f32])| {
        let c0 = b * B;
        let w = (cols - c0).min(B);
        let mut tile = [[0f32; B]; B];
        for r0 in (0..rows).step_by(B) {
            let h = (rows - r0).min(B);
            for (r, line) in tile.iter_mut().enumerate().take(h) {
                let at = (r0 + r) * cols + c0;
                line[..w].copy_from_slice(&a[at..at + w]);
            }
            for c in 0..w {
                let out = &mut tb[c * rows + r0..c * rows + r0 + h];
                for (r, o) in out.iter_mut().enumerate() {
                    *o = tile[r][c];
                }
            }
        }
    };
    if rows * cols >= 1 << 16 {
        t.par_chunks_mut(B * rows).enumerate().for_each(band);
    } else {
        t.chunks_mut(B * rows).enumerate().for_each(band);
    }
    t
}

/// `x[n, cols]` (a burn tensor, no autodiff) times each matrix, quantizing `x` once.
pub fn matmul_tensors(mats: &[&Q8Matrix], x: Tensor<2>) -> Result<Vec<Tensor<2>>, QuantError> {
    if x.is_tracked() {
        return Err(QuantError::Tracked);
    }
    let device = x.device();
    let [n, cols] = x.dims();
    let v: Vec<f32> =
        x.into_data()
            .convert::<f32>()
            .try_into_vec()
            .map_err(|_| QuantError::Shape {
                what: "activations (not convertible to f32)".into(),
                got: 0,
                expected: n * cols,
            })?;
    for m in mats {
        if m.cols != cols {
            return Err(QuantError::Shape {
                what: format!("input of a [{} x {}] Q8_0 matrix", m.rows, m.cols),
                got: cols,
                expected: m.cols,
            });
        }
    }
    let qx = QRows::quantize(&v, n, cols)?;
    let ys = matmul_many_q(DotPath::detect(), mats, &qx);
    Ok(ys
        .into_iter()
        .zip(mats)
        .map(|(y, m)| Tensor::from_data(TensorData::new(y, [n, m.rows]), &device))
        .collect())
}

/// The result of a quantized matmul in the forward pass, whose shapes the model has checked;
/// the one error left is autodiff, which has no backward here.
pub(crate) fn expect_q8(r: Result<Vec<Tensor<2>>, QuantError>) -> Vec<Tensor<2>> {
    r.unwrap_or_else(|e| panic!("Q8_0 base: {e}"))
}

/// What quantizing a model did.
#[derive(Debug, Clone, Copy)]
pub struct QuantReport {
    /// Bytes of the fp32 tensors replaced.
    pub fp32_bytes: usize,
    /// Bytes of the Q8_0 matrices that replace them.
    pub q8_bytes: usize,
}

/// Hand freed heap pages back to the system: the binaries tune glibc's allocator never to trim
/// on its own (`backend::tune_allocator`), which would keep the dropped fp32 weights resident.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `malloc_trim` only returns free pages of the allocator's arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    // Tests of the Q8_0 base: the block rule against the GGUF reader, the matmul against a scalar
    // reference on awkward shapes, every dot path against the portable one, and a tiny random
    // model whose quantized forward (full and KV-cached) stays close to fp32.

    use super::*;
    use crate::gguf::{self, GgmlType};
    use crate::model::{to_rows, KvCache, Llama, ModelConfig};
    use burn::tensor::Device;

    use test_support::seeded_noise as seeded;

    /// `x[n, cols] · w[rows, cols]ᵀ` in f64.
    fn reference(x: &[f32], w: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * rows];
        for i in 0..n {
            for j in 0..rows {
                y[i * rows + j] = (0..cols)
                    .map(|k| x[i * cols + k] as f64 * w[j * cols + k] as f64)
                    .sum();
            }
        }
        y
    }

    /// The activations as the kernels see them after quantization.
    fn dequantized_rows(q: &QRows, cols: usize) -> Vec<f32> {
        (0..q.n)
            .flat_map(|i| {
                (0..cols).map(move |k| q.qs[i * q.nb * QK + k] as f32 * q.d[i * q.nb + k / QK])
            })
            .collect()
    }

    #[test]
    fn rounding_matches_std_round_at_halves_and_their_neighbours() {
        let mut xs = vec![0.0f32, -0.0, 127.0, -127.0, 127.49, -127.5];
        for k in -256..=256 {
            let h = k as f32 * 0.5;
            xs.extend([h, h.next_up(), h.next_down()]);
        }
        for x in xs {
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
    }

    #[test]
    fn whole_finite_blocks_quantize_as_the_scalar_rule_and_others_fall_back() {
        // The rule written out value by value, with the saturating cast: what the fast path
        // (whole blocks of finite values) must reproduce exactly.
        fn rule(values: &[f32]) -> ([i8; QK], f32) {
            let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; QK];
            for (i, qi) in q.iter_mut().enumerate() {
                let v = values.get(i).copied().unwrap_or(0.0);
                *qi = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
            (q, d)
        }
        let mut blocks: Vec<Vec<f32>> = (0..200).map(|k| seeded(QK, 500 + k, 3.0)).collect();
        // Values landing on halves of a step, zeros, one huge value, a short block, and
        // non-finite values (the fallback: NaN quantises to 0, an infinity makes every step 0).
        blocks.push((0..QK).map(|i| i as f32 * 0.5 - 8.0).collect());
        blocks.push(vec![0.0; QK]);
        let mut big = seeded(QK, 9, 1.0);
        big[7] = 3.0e38;
        blocks.push(big);
        blocks.push(seeded(13, 10, 1.0));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut b = seeded(QK, 11, 1.0);
            b[4] = bad;
            blocks.push(b);
        }
        for (k, b) in blocks.iter().enumerate() {
            let mut q = [0i8; QK];
            let d = quantize_block(b, &mut q);
            let (want, wd) = rule(b);
            assert_eq!(q, want, "block {k}");
            assert!(
                d == wd || (d.is_nan() && wd.is_nan()),
                "block {k}: {d} vs {wd}"
            );
        }
    }

    #[test]
    fn blocks_are_the_gguf_writers_and_read_back_exactly() {
        let v = seeded(5 * 70, 3, 2.0);
        let m = Q8Matrix::quantize(&v, 5, 70).unwrap();
        for r in 0..5 {
            // The writer pads each row to whole blocks the same way.
            let bytes = gguf::writer::quantize(GgmlType::Q8_0, &v[r * 70..(r + 1) * 70]);
            let back = gguf::dequantize(GgmlType::Q8_0, &bytes, 70);
            assert_eq!(back, m.dequantize_row(r), "row {r}");
            // Quantizing the dequantized values again gives the same blocks (a Q8_0 file loses
            // nothing more when its base is held quantized).
            let again = Q8Matrix::quantize(&back, 1, 70).unwrap();
            assert_eq!(again.dequantize_row(0), back, "row {r} re-quantized");
            // Within half a step of the original.
            for (k, (&a, &b)) in v[r * 70..(r + 1) * 70].iter().zip(&back).enumerate() {
                let d = m.d[r * m.nb + k / QK];
                let step = half::f16::from_bits(d).to_f32();
                assert!((a - b).abs() <= 0.5 * step * 1.01 + 1e-7, "{a} vs {b}");
            }
        }
        assert!(Q8Matrix::quantize(&v, 5, 71).is_err());
    }

    #[test]
    fn matmul_matches_the_scalar_reference_on_awkward_shapes() {
        let mut seed = 10;
        // n: decode, odd, and a prompt-sized block; cols: whole blocks, a ragged last block,
        // fewer than one block, and the model's widths; rows large enough for the parallel path.
        for &(n, rows, cols) in &[
            (1, 7, 32),
            (3, 5, 45),
            (6, 11, 96),
            (2, 9, 7),
            (5, 33, 576),
            (1, 1536, 576),
            (17, 300, 1536),
            (4, 0, 64),
            (0, 8, 64),
        ] {
            seed += 1;
            let w = seeded(rows * cols, seed, 0.3);
            let x = seeded(n * cols, seed + 100, 3.0);
            let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
            let y = m.matmul(&x, n).unwrap();
            assert_eq!(y.len(), n * rows);
            // Exact up to f32 rounding against the dequantized operands.
            let wd: Vec<f32> = (0..rows).flat_map(|r| m.dequantize_row(r)).collect();
            let xq = QRows::quantize(&x, n, cols).unwrap();
            let xd = dequantized_rows(&xq, cols);
            let exact = reference(&xd, &wd, n, rows, cols);
            let scale = exact.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
            for (k, (&a, &b)) in y.iter().zip(&exact).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= 1e-5 * scale,
                    "[{n}x{rows}x{cols}] #{k}: {a} vs {b}"
                );
            }
            // Within the quantization error of the fp32 product: each operand carries at most
            // half a step (max/254) per value.
            let fp = reference(&x, &w, n, rows, cols);
            for (k, (&a, &b)) in y.iter().zip(&fp).enumerate() {
                let bound = 2.0 * (cols as f64).sqrt() * 3.0 * 0.3 / 254.0 + 1e-6;
                assert!(
                    (a as f64 - b).abs() <= bound,
                    "[{n}x{rows}x{cols}] #{k}: {a} vs fp32 {b} (bound {bound})"
                );
            }
        }
        // A wrong activation length is an error, not a panic.
        let m = Q8Matrix::quantize(&seeded(64, 1, 1.0), 2, 32).unwrap();
        assert!(matches!(
            m.matmul(&[0.0; 31], 1),
            Err(QuantError::Shape { .. })
        ));
    }

    #[test]
    fn every_dot_path_agrees_with_the_portable_one() {
        // One activation row (decoding), fewer than a tile, tiles and a remainder; an odd and
        // an even number of blocks per row.
        for (n, cols) in [(1, 45 + 576 + 32), (1, 576), (2, 576), (7, 45 + 576 + 32)] {
            let rows = 200;
            let w = seeded(rows * cols, 77, 0.5);
            // Include values that quantize to +-127 and to 0.
            let mut x = seeded(n * cols, 78, 4.0);
            x[3] = 4.0;
            x[4] = -4.0;
            x[5] = 0.0;
            let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
            let base = m.matmul_with(DotPath::Portable, &x, n).unwrap();
            let (_, hw) = crate::cpu::hardware();
            // The NEON kernel sums each block in int32 and accumulates in the portable
            // kernel's order: the same bits (on other CPUs it is the portable kernel).
            assert_eq!(m.matmul_with(DotPath::NeonDot, &x, n).unwrap(), base);
            for path in [DotPath::Avx2, DotPath::Avx512Vnni] {
                let y = m.matmul_with(path, &x, n).unwrap();
                let worst = y
                    .iter()
                    .zip(&base)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs() / q.abs().max(1.0)));
                assert!(
                    worst < 1e-5,
                    "{path} (hardware offers {hw}), n {n}, cols {cols}: differs from portable \
                     by {worst}"
                );
            }
        }
        assert!(
            "q4_k".parse::<BasePrecision>().is_err()
                && "Q8_0".parse::<BasePrecision>().unwrap() == BasePrecision::Q8_0
        );
    }

    #[test]
    fn grouped_products_equal_each_matrix_alone_above_and_below_the_split() {
        // SmolLM2's q, k and v shapes at one decoded token (together past the parallel split,
        // k and v alone under it), at a short prompt, and a small group that stays serial.
        let cols = 576;
        let mats: Vec<Q8Matrix> = [576usize, 192, 192]
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                Q8Matrix::quantize(&seeded(rows * cols, 90 + i as u32, 0.5), rows, cols).unwrap()
            })
            .collect();
        let small = Q8Matrix::quantize(&seeded(3 * 64, 95, 0.5), 3, 64).unwrap();
        let refs: Vec<&Q8Matrix> = mats.iter().collect();
        let path = DotPath::detect();
        for n in [1, 5] {
            let qx = QRows::quantize(&seeded(n * cols, 99, 2.0), n, cols).unwrap();
            let together = matmul_many_q(path, &refs, &qx);
            assert_eq!(together.len(), 3);
            for (m, y) in mats.iter().zip(&together) {
                assert_eq!(y, &m.matmul_q(path, &qx), "n {n}, {} rows", m.rows);
                // Each output is its weight row's dot product whichever task ran it: the
                // portable kernel's over the same rows agrees to rounding.
                let single = m.matmul_q(DotPath::Portable, &qx);
                let worst = y
                    .iter()
                    .zip(&single)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs() / q.abs().max(1.0)));
                assert!(worst < 1e-5, "n {n}: {worst}");
            }
        }
        let qx = QRows::quantize(&seeded(2 * 64, 96, 2.0), 2, 64).unwrap();
        let y = matmul_many_q(path, &[&small, &small], &qx);
        assert_eq!(y[0], y[1]);
        assert_eq!(y[0], small.matmul_q(path, &qx));
    }

    fn tiny(n_layers: usize, tie: bool) -> ModelConfig {
        // d_model 64 and ffn 80: the MLP's input width is not a multiple of 32.
        let mut c = ModelConfig::dense(97, 64, n_layers, 4, 2, 16, 80, tie);
        c.max_seq_len = 64;
        c
    }

    #[test]
    fn quantized_tiny_model_stays_close_and_caches_alike() {
        let device = Device::flex();
        for tie in [true, false] {
            let fp = Llama::random(tiny(2, tie), 5, &device);
            let mut q = fp.clone();
            let rep = q
                .set_base_precision(BasePrecision::Q8_0)
                .unwrap()
                .expect("quantized");
            assert!(q.quant_base().is_some() && fp.quant_base().is_none());
            // The fp32 tensors are gone from the quantized model.
            assert_eq!(q.blocks[0].wq.dims(), [0, 0]);
            assert!(rep.q8_bytes * 3 < rep.fp32_bytes, "{rep:?}");
            let ids: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
            let a = to_rows(fp.forward(fp.tokens_tensor(&[ids.clone()]), None));
            let b = to_rows(q.forward(q.tokens_tensor(&[ids.clone()]), None));
            let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .flatten()
                .zip(b.iter().flatten())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst < 0.05 * scale, "tie {tie}: {worst} of {scale}");
            // KV-cached decoding of the quantized model equals its full forward.
            let mut cache = KvCache::new(2);
            let mut rows = to_rows(q.logits(q.hidden(
                q.tokens_tensor(&[ids[..5].to_vec()]),
                None,
                Some(&mut cache),
            )));
            for &t in &ids[5..] {
                rows.extend(to_rows(q.logits(q.hidden(
                    q.tokens_tensor(&[vec![t]]),
                    None,
                    Some(&mut cache),
                ))));
            }
            for (r, c) in b.iter().flatten().zip(rows.iter().flatten()) {
                assert!((r - c).abs() < 1e-4, "{r} vs {c}");
            }
        }
    }
}
