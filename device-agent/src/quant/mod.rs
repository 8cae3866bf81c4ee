//! A frozen base kept quantized in memory (`--base-precision q8_0 | q4_0 | q4_1`, for
//! `generate`, `eval` and `tune` ([`frozen`]); a model takes it on through
//! `Llama::set_base_precision`): GGUF's blocks of 32 values along the *input* dimension of each
//! output row ([`QMatrix`]): Q8_0 (int8 values and an f16 scale) or the 4-bit Q4_0 and Q4_1
//! ([`q4`]: nibbles, an f16 scale and for Q4_1 an f16 minimum). A matmul multiplies from them,
//! quantizing the activations' rows to Q8_0 blocks and summing int8 products exactly in int32
//! ([`kernels`]: AVX-512 VNNI, AVX2, aarch64 `sdot`, portable; chosen at run time by
//! [`crate::cpu::DotPath`]). A 4-bit matrix is unpacked to int8 a few rows at a time into a
//! per-thread buffer of at most [`UNPACK_BYTES`] or one tile of rows (so the weights are read
//! from memory at 4.5 or 5 bits each) and goes through the same kernels; Q4_1 adds its block midpoint `(m + 8 d) *
//! sum(x)` per block.
//! Output rows are split across rayon's threads, so one decoded token pulls the weights through
//! every core.
//!
//! With a 4-bit base the embedding table and the LM head stay Q8_0 (as llama.cpp keeps its
//! output matrix at higher precision): they are a fifth of SmolLM2-135M's weights and the
//! logits are where 4-bit error shows most.
//!
//! The block rules ([`quantize_block`], [`q4`]) are the ones the GGUF writer uses, so a file
//! read back and quantized again at its own format gives the same blocks. Blocks are stored as
//! separate arrays (values, scales, minimums) rather than interleaved records; the content is
//! the same. An input dimension that is not a multiple of 32 (a pruned MLP) pads its last block
//! with zeros. Slicing: output rows can be dropped freely; input columns only by whole
//! 32-blocks, so a pruned model is sliced in fp32 first and quantized afterwards.
//!
//! The LoRA path stays fp32 and is added on top (QLoRA style). Training takes its products
//! from the dequantized weights instead ([`frozen`], with an input gradient), and a pruned
//! block is sliced in fp32 and quantized again (`Llama::set_block`).

mod base;
mod file_blocks;
pub mod frozen;
pub mod kernels;
pub mod q4;
pub mod rowwise;

pub use base::QuantBase;

use std::cell::RefCell;
use std::sync::OnceLock;

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::cpu::DotPath;
use kernels::{NibArgs, RowArgs, QK};
use q4::NIB;

/// Errors of the quantized base.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{what}: {got} values, expected {expected}")]
    Shape {
        what: String,
        got: usize,
        expected: usize,
    },
    #[error("{0}")]
    Blocks(String),
    #[error("unknown base precision '{0}' (f32, q8_0, q4_0, q4_1)")]
    UnknownPrecision(String),
    #[error("int8 products from a quantized base have no backward pass: training takes its products from the dequantized weights (QuantArithmetic::Fp32)")]
    Tracked,
}

/// How the frozen base's projections are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasePrecision {
    #[default]
    F32,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl BasePrecision {
    /// The block format of the projections; `None` for fp32.
    pub fn format(self) -> Option<BlockFormat> {
        match self {
            BasePrecision::F32 => None,
            BasePrecision::Q8_0 => Some(BlockFormat::Q8_0),
            BasePrecision::Q4_0 => Some(BlockFormat::Q4_0),
            BasePrecision::Q4_1 => Some(BlockFormat::Q4_1),
        }
    }
}

/// The format of the embedding table and the LM head whatever the projections' (4-bit
/// error shows most in the logits); the GGUF export writes them the same way.
pub const TABLE_FORMAT: BlockFormat = BlockFormat::Q8_0;

/// The GGUF block format of a [`QMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl std::fmt::Display for BlockFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
        })
    }
}

/// How products from a quantized base are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantArithmetic {
    /// Serving (`generate`, `eval`), the default: a product of fewer than [`FP32_ROWS`] rows
    /// (a decoded token's) is [`QuantArithmetic::Int8`]'s, one of more (a prompt, an evaluation
    /// batch) is [`QuantArithmetic::Fp32`]'s. Reading the weight's bytes bounds a few rows,
    /// where the int8 kernels read a quarter or less of fp32's; many rows are bound by
    /// arithmetic, where the fp32 product of the dequantized weight (one transient copy of it)
    /// runs faster than the int8 kernels, and it rounds only the weights.
    #[default]
    Serving,
    /// Every product from int8 sums of activations quantized to Q8_0 too ([`kernels`]): what a
    /// decoded token takes, at any size (the tests measure the kernels' accuracy with it).
    Int8,
    /// Training (`tune`): fp32 products of the activations with the dequantized weight, one
    /// matrix at a time, with an input gradient ([`frozen`]: QLoRA's arithmetic).
    Fp32,
}

/// Rows from which [`QuantArithmetic::Serving`] takes a product in fp32 from the dequantized
/// weight: on the Zen 5 host of BENCHMARKS.md ("Quantized prompts through fp32 products") the
/// two routes cross between about 30 (Q4_1) and 80 (Q8_0) prompt tokens; dequantizing every
/// weight once per forward costs a prompt of a few tokens about twice the int8 route's time.
pub const FP32_ROWS: usize = 64;

impl QuantArithmetic {
    /// Whether a product of `rows` rows is taken in fp32 from the dequantized weight.
    pub fn fp32_for(self, rows: usize) -> bool {
        match self {
            QuantArithmetic::Serving => rows >= FP32_ROWS,
            QuantArithmetic::Int8 => false,
            QuantArithmetic::Fp32 => true,
        }
    }
}

impl std::str::FromStr for BasePrecision {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(BasePrecision::F32),
            "q8_0" | "q8" => Ok(BasePrecision::Q8_0),
            "q4_0" => Ok(BasePrecision::Q4_0),
            "q4_1" => Ok(BasePrecision::Q4_1),
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

/// A `[rows, cols]` matrix in GGUF blocks along `cols` (for a projection: rows = outputs,
/// cols = inputs). Equal when format, shape and every block are.
#[derive(Clone, PartialEq)]
pub struct QMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Blocks per row, `ceil(cols / 32)`.
    nb: usize,
    /// Q8_0: `rows * nb * 32` values, each in `-127..=127`; empty otherwise.
    qs: Vec<i8>,
    /// Q4_0 and Q4_1: `rows * nb * 16` bytes of nibbles in GGUF's order; empty otherwise.
    nib: Vec<u8>,
    /// `rows * nb` f16 scales (bits).
    d: Vec<u16>,
    /// Q4_1: `rows * nb` f16 block minimums (bits); empty otherwise.
    m: Vec<u16>,
    /// Q4_1: each block's midpoint `m + 8 d` in f32, made from `m` and `d` on the first
    /// product ([`QMatrix::midpoints`]).
    mids: Midpoints,
}

/// A derived cache of a Q4_1 matrix's block midpoints: made once, from blocks that no longer
/// change (every constructor fills `d` and `m` before any product), so it takes no part in
/// equality. Converting each product's `m` and `d` from f16 again was about a fifth of a Q4_1
/// token's cycles (`perf`, session 29).
#[derive(Clone, Default)]
struct Midpoints(OnceLock<Vec<f32>>);

impl PartialEq for Midpoints {
    fn eq(&self, _: &Midpoints) -> bool {
        true
    }
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix[{} x {}, {}]", self.rows, self.cols, self.format)
    }
}

/// Activation rows quantized to Q8_0 blocks (scales kept in f32).
pub struct QRows {
    n: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    /// Per block, `d * sum(qs)`: what a Q4_1 block's midpoint multiplies; computed on the first
    /// product from a Q4_1 matrix, never for the other formats.
    sums: OnceLock<Vec<f32>>,
    /// Per block and lane of eight, `-8 *` the sum of the lane's four values: the fused 4-bit
    /// kernels start each block's int32 lanes from it, which turns their products with
    /// unsigned nibbles `q` into products with `q - 8`; computed on the first such product.
    offsets: OnceLock<Vec<i32>>,
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
        Ok(QRows {
            n,
            nb,
            qs,
            d,
            sums: OnceLock::new(),
            offsets: OnceLock::new(),
        })
    }

    /// Per block and lane, `-8 *` the lane's sum (see `offsets`).
    pub(crate) fn nibble_offsets(&self) -> &[i32] {
        self.offsets.get_or_init(|| {
            self.qs
                .chunks_exact(4)
                .map(|q| -8 * q.iter().map(|&v| i32::from(v)).sum::<i32>())
                .collect()
        })
    }

    /// Per block, `d * sum(qs)` (see `sums`).
    fn block_sums(&self) -> &[f32] {
        self.sums.get_or_init(|| {
            self.qs
                .chunks_exact(QK)
                .zip(&self.d)
                .map(|(q, &d)| d * q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32)
                .collect()
        })
    }
}

/// Most bytes of unpacked int8 rows a thread holds at once while multiplying from a 4-bit
/// matrix: small enough to stay in the core's L1/L2 while the kernel reads it back.
pub const UNPACK_BYTES: usize = 16 << 10;

thread_local! {
    /// Each thread's buffer of unpacked 4-bit rows (at most [`UNPACK_BYTES`], or one tile of
    /// [`kernels::TILE`] rows where rows are wider).
    static UNPACKED: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
}

impl QMatrix {
    /// A `[rows, cols]` matrix of `format` with no blocks yet (its vectors empty).
    fn empty(format: BlockFormat, rows: usize, cols: usize) -> QMatrix {
        QMatrix {
            format,
            rows,
            cols,
            nb: cols.div_ceil(QK),
            qs: Vec::new(),
            nib: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
            mids: Midpoints::default(),
        }
    }

    /// Q4_1's block midpoints `m + 8 d` (`rows * nb`, f32), computed on the first call: each
    /// is `m`'s f32 plus eight times `d`'s (both exact conversions of f16, one rounding in
    /// the sum). Empty for the other formats.
    fn midpoints(&self) -> &[f32] {
        self.mids.0.get_or_init(|| {
            let tab = f16_table();
            self.m
                .iter()
                .zip(&self.d)
                .map(|(&m, &d)| tab[m as usize] + 8.0 * tab[d as usize])
                .collect()
        })
    }

    /// Quantize a row-major `[rows, cols]` matrix to `format`'s blocks.
    pub fn quantize(
        format: BlockFormat,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix, QuantError> {
        if values.len() != rows * cols {
            return Err(QuantError::Shape {
                what: format!("matrix [{rows}, {cols}]"),
                got: values.len(),
                expected: rows * cols,
            });
        }
        let nb = cols.div_ceil(QK);
        let f16 = |v: f32| half::f16::from_f32(v).to_bits();
        let mut m = QMatrix::empty(format, rows, cols);
        m.d = vec![0u16; rows * nb];
        if nb == 0 {
            return Ok(m);
        }
        // Block `b` of row `r`'s values (the last one of a ragged row short).
        let block = |r: usize, b: usize| {
            let row = &values[r * cols..(r + 1) * cols];
            &row[b * QK..((b + 1) * QK).min(cols)]
        };
        match format {
            BlockFormat::Q8_0 => {
                m.qs = vec![0i8; rows * nb * QK];
                m.qs.par_chunks_mut(nb * QK)
                    .zip(m.d.par_chunks_mut(nb))
                    .enumerate()
                    .for_each(|(r, (q, dr))| {
                        for (b, (qb, db)) in q.chunks_exact_mut(QK).zip(dr).enumerate() {
                            let qb: &mut [i8; QK] = qb.try_into().expect("chunks of QK");
                            *db = f16(quantize_block(block(r, b), qb));
                        }
                    });
            }
            BlockFormat::Q4_0 => {
                m.nib = vec![0u8; rows * nb * q4::NIB];
                m.nib
                    .par_chunks_mut(nb * q4::NIB)
                    .zip(m.d.par_chunks_mut(nb))
                    .enumerate()
                    .for_each(|(r, (q, dr))| {
                        for (b, (qb, db)) in q.chunks_exact_mut(q4::NIB).zip(dr).enumerate() {
                            let qb: &mut [u8; q4::NIB] = qb.try_into().expect("chunks of NIB");
                            *db = f16(q4::quantize_block_q4_0(block(r, b), qb));
                        }
                    });
            }
            BlockFormat::Q4_1 => {
                m.nib = vec![0u8; rows * nb * q4::NIB];
                m.m = vec![0u16; rows * nb];
                m.nib
                    .par_chunks_mut(nb * q4::NIB)
                    .zip(m.d.par_chunks_mut(nb))
                    .zip(m.m.par_chunks_mut(nb))
                    .enumerate()
                    .for_each(|(r, ((q, dr), mr))| {
                        let blocks = q.chunks_exact_mut(q4::NIB).zip(dr).zip(mr);
                        for (b, ((qb, db), mb)) in blocks.enumerate() {
                            let qb: &mut [u8; q4::NIB] = qb.try_into().expect("chunks of NIB");
                            let (d, lo) = q4::quantize_block_q4_1(block(r, b), qb);
                            (*db, *mb) = (f16(d), f16(lo));
                        }
                    });
            }
        }
        Ok(m)
    }

    /// Quantize a projection held as burn holds it, `[in, out]`: rows become the outputs.
    pub fn from_in_out(format: BlockFormat, w: Tensor<2>) -> Result<QMatrix, QuantError> {
        let [i, o] = w.dims();
        Self::from_rows(format, w.transpose(), o, i)
    }

    /// Quantize a `[rows, cols]` tensor as it is.
    pub fn from_rows(
        format: BlockFormat,
        w: Tensor<2>,
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix, QuantError> {
        let v: Vec<f32> =
            w.into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|_| QuantError::Shape {
                    what: "weights (not convertible to f32)".into(),
                    got: 0,
                    expected: rows * cols,
                })?;
        Self::quantize(format, &v, rows, cols)
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held while multiplying: values, f16 scales and minimums, and Q4_1's f32 block
    /// midpoints (made on its first product).
    pub fn bytes(&self) -> usize {
        self.qs.len() + self.nib.len() + 2 * (self.d.len() + self.m.len()) + 4 * self.m.len()
    }

    /// Values `v0..v1` (counted over the padded rows, whole blocks) as the kernels read them,
    /// int8: Q8_0's as they are, a 4-bit format's unpacked ([`q4::unpack`]) less 8 (Q4_1's
    /// too: its block is then `(q - 8) d` plus its midpoint `m + 8 d`, which is near zero for
    /// a weight block, where `m` itself is about `-8 d`, so the term added after the int8
    /// sums stays small instead of cancelling most of them).
    #[inline(always)]
    pub(super) fn int8_rows_range(&self, v0: usize, v1: usize, out: &mut [i8]) {
        match self.format {
            BlockFormat::Q8_0 => out.copy_from_slice(&self.qs[v0..v1]),
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                q4::unpack(&self.nib[v0 / 2..v1 / 2], 8, out);
            }
        }
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

    /// Weight rows `j0..j0 + y.len() / n` against every activation row into `y` (`y[j * n +
    /// i]`): Q8_0 straight from its blocks, a 4-bit format a few rows at a time through the
    /// thread's unpacking buffer, then Q4_1's `(m + 8 d) * d_x * sum(q_x)` per block.
    fn row_products(&self, path: DotPath, qx: &QRows, j0: usize, y: &mut [f32]) {
        let (n, nb) = (qx.n, self.nb);
        let j1 = j0 + y.len() / n;
        // The kernel's view of weight rows `j0..j1` whose int8 values are `qw`.
        fn args<'a>(
            m: &'a QMatrix,
            qx: &'a QRows,
            qw: &'a [i8],
            j0: usize,
            j1: usize,
        ) -> RowArgs<'a> {
            RowArgs {
                nb: m.nb,
                qw,
                dw: &m.d[j0 * m.nb..j1 * m.nb],
                qx: &qx.qs,
                dx: &qx.d,
                tab: f16_table(),
            }
        }
        if self.format == BlockFormat::Q8_0 {
            let qw = &self.qs[j0 * nb * QK..j1 * nb * QK];
            kernels::row_dots(path, &args(self, qx, qw, j0, j1), y);
            return;
        }
        let fused = kernels::fuses_nibbles(path, n);
        // Whole tiles per unpacked chunk, as per task (see [`matmul_many_q`]).
        let step =
            (UNPACK_BYTES / (nb * QK).max(1) / kernels::TILE * kernels::TILE).max(kernels::TILE);
        UNPACKED.with_borrow_mut(|buf| {
            if !fused {
                buf.resize(step.min(j1 - j0) * nb * QK, 0);
            }
            for (c, yc) in y.chunks_mut(step * n).enumerate() {
                let a0 = j0 + c * step;
                let a1 = a0 + yc.len() / n;
                let q4_1 = self.format == BlockFormat::Q4_1;
                // A fused kernel over one activation row (a decoded token) adds Q4_1's midpoint
                // term inside its row loop (the same operations as `add_midpoints`: see
                // `kernels::midpoint_dot`); over several (aarch64's `sdot` takes a prompt's rows
                // too) and after the unpacked kernels, `add_midpoints` adds it.
                let in_kernel = fused && q4_1 && n == 1;
                if fused {
                    let (mids, sums): (&[f32], &[f32]) = if in_kernel {
                        (&self.midpoints()[a0 * nb..a1 * nb], qx.block_sums())
                    } else {
                        (&[], &[])
                    };
                    let a = NibArgs {
                        nb,
                        nib: &self.nib[a0 * nb * NIB..a1 * nb * NIB],
                        dw: &self.d[a0 * nb..a1 * nb],
                        qx: &qx.qs,
                        dx: &qx.d,
                        off: kernels::offsets_for(path, qx),
                        tab: f16_table(),
                        mids,
                        sums,
                    };
                    kernels::nib_row_dots(path, &a, yc);
                } else {
                    let q = &mut buf[..(a1 - a0) * nb * QK];
                    self.int8_rows_range(a0 * nb * QK, a1 * nb * QK, q);
                    kernels::row_dots(path, &args(self, qx, q, a0, a1), yc);
                }
                if q4_1 && !in_kernel {
                    add_midpoints(&self.midpoints()[a0 * nb..a1 * nb], qx.block_sums(), nb, yc);
                }
            }
        });
    }
}

multiversion! {
    /// `y[j, i] += midpoint_dot(mids[j], sums[i])` over rows `j` of `nb` block midpoints and
    /// activation rows `i` of `nb` block sums (`y` is `[rows, n]`). Compiled per instruction
    /// set; the same fused multiply-adds in the same order on each (and in the fused 4-bit
    /// kernels), so the same values.
    fn add_midpoints(mids: &[f32], sums: &[f32], nb: usize, y: &mut [f32]) {
        let n = sums.len() / nb.max(1);
        for (mj, yj) in mids.chunks_exact(nb).zip(y.chunks_mut(n)) {
            for (yi, si) in yj.iter_mut().zip(sums.chunks_exact(nb)) {
                *yi += kernels::midpoint_dot(mj, si);
            }
        }
    }
}

/// Several matrices times the same quantized activations (`qx` has their block count), `y[n,
/// rows]` each. Their weight rows are split over the pool together: a decoded token's k and v
/// products are each too small to split (a task per thread would cost more than it saves), so
/// taken one by one they ran on one thread after q; together they run beside it. Every output
/// is one weight row's dot products, whichever task computes it, and every task starts at a
/// whole tile of the tiled kernel, so neither the split nor the thread count changes a value.
pub fn matmul_many_q(path: DotPath, mats: &[&QMatrix], qx: &QRows) -> Vec<Vec<f32>> {
    let n = qx.n;
    for m in mats {
        assert_eq!(qx.nb, m.nb, "activations quantized for another width");
    }
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.rows * n]).collect();
    if n == 0 {
        return outs;
    }
    // Once, before the tasks, so none of them waits on another's first call.
    for m in mats.iter().filter(|m| m.format == BlockFormat::Q4_1) {
        qx.block_sums();
        m.midpoints();
    }
    if mats.iter().any(|m| m.format != BlockFormat::Q8_0) && kernels::fuses_nibbles(path, n) {
        kernels::offsets_for(path, qx);
    }
    let macs: usize = mats.iter().map(|m| m.rows * n * m.nb * QK).sum();
    if macs < 1 << 18 {
        for (m, y) in mats.iter().zip(outs.iter_mut()) {
            m.row_products(path, qx, 0, y);
        }
    } else {
        let threads = rayon::current_num_threads().max(1);
        let mut left: usize = mats.iter().map(|m| m.rows).sum();
        // Guided sizes: each task a share of the rows still left, down to about 8 KiB of
        // weights, so the threads' last tasks are short and finish close together. Whole
        // tiles of rows (the tiled kernel sums a partial tile's rows in another order).
        let mut tasks: Vec<(&QMatrix, usize, &mut [f32])> = Vec::new();
        for (m, y) in mats.iter().zip(outs.iter_mut()) {
            let least = (8192 * m.rows / m.bytes().max(1)).max(1);
            let (mut j0, mut rest) = (0, y.as_mut_slice());
            while j0 < m.rows {
                let size = (left / (2 * threads))
                    .max(least)
                    .next_multiple_of(kernels::TILE)
                    .min(m.rows - j0);
                let (ys, tail) = rest.split_at_mut(size * n);
                tasks.push((m, j0, ys));
                (j0, rest, left) = (j0 + size, tail, left - size);
            }
        }
        crate::kernels::team::for_each(tasks, |(m, j0, ys)| m.row_products(path, qx, j0, ys));
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
pub fn matmul_tensors(mats: &[&QMatrix], x: Tensor<2>) -> Result<Vec<Tensor<2>>, QuantError> {
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
pub(crate) fn expect_quant(r: Result<Vec<Tensor<2>>, QuantError>) -> Vec<Tensor<2>> {
    r.unwrap_or_else(|e| panic!("Q8_0 base: {e}"))
}

/// What quantizing a model did.
#[derive(Debug, Clone, Copy)]
pub struct QuantReport {
    /// Bytes of the fp32 tensors replaced.
    pub fp32_bytes: usize,
    /// Bytes of the Q8_0 matrices that replace them.
    pub quant_bytes: usize,
}

impl std::fmt::Display for QuantReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: usize| b as f64 / 1e6;
        let (q, fp) = (mb(self.quant_bytes), mb(self.fp32_bytes));
        write!(f, "{q:.0} MB instead of {fp:.0} MB fp32")
    }
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
mod tests;
