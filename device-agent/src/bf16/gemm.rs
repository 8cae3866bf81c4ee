//! Matrix products with bf16 inputs and fp32 accumulation on AVX-512-BF16 (`vdpbf16ps`), for the
//! frozen base's projections: `out[m][n] = sum_k a[m][k] * b[k][n]`, where `a` (activations or
//! output gradients) is rounded to bf16 per call and `b` (a frozen weight) is packed once per
//! call into [`PackedB`].
//!
//! `vdpbf16ps` multiplies pairs: each of its 16 fp32 lanes adds `x[2i] * y[2i] + x[2i+1] *
//! y[2i+1]`. So `b` is packed in panels of [`NR`] = 32 output columns, and within a panel by pairs
//! of the reduced dimension: one 32-bit word per column holds `b[2p][j]` (low half) and
//! `b[2p+1][j]` (high half), 32 words per pair (two vectors). `a` is rounded row by row into
//! bf16, which in memory is already its pairs (`a[r][2p]`, `a[r][2p+1]` adjacent); the kernel
//! broadcasts one pair of row `r` to every lane and multiplies it into both vectors of the panel.
//! An odd reduced dimension is padded with a zero; a ragged last panel with zero columns (stored
//! under a mask); a ragged last group of rows reuses the last row (its results are not stored).
//!
//! A micro-tile is [`MR`] = 8 rows by 32 columns: 16 accumulators, two panel loads and eight
//! broadcasts per pair, over the whole reduced dimension (no blocking along it: the shapes of a
//! 135M-parameter model keep a tile's rows of `a`, at most 8 x 1536 bf16, in L1). Work is split
//! over rayon's threads by blocks of rows and groups of panels.
//!
//! [`reference`] computes the same products one at a time in fp32 from the same rounded values:
//! the tests hold the SIMD kernel to it, and a machine without the instructions never calls the
//! kernel (the caller runs fp32 instead: [`available`]).

use rayon::prelude::*;

/// Output columns per packed panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per micro-tile.
pub const MR: usize = 8;
/// Rows of `a` handed to one task.
const ROW_BLOCK: usize = 64;

/// Round to bf16 (nearest, ties to even; NaN stays NaN).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The fp32 value of a bf16 bit pattern.
#[inline]
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Does this CPU have the instructions the kernel needs?
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How a weight matrix is laid out relative to the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `w` is `[n][k]` (a linear layer's `[out][in]` weight): the product is `a * w^T`, the
    /// layer's forward pass.
    Transposed,
    /// `w` is `[k][n]`: the product is `a * w`, the same layer's input gradient (`k` = out).
    Plain,
}

/// A weight rounded to bf16 and packed for the kernel.
pub struct PackedB {
    k: usize,
    n: usize,
    pairs: usize,
    /// `[panel][pair][NR]` words, each two bf16 (`b[2p][j]` low, `b[2p+1][j]` high).
    words: Vec<u32>,
}

impl PackedB {
    /// Pack `w` (`rows x cols`, row-major) for products of the given layout: `Transposed` reads
    /// it as `[n][k]`, `Plain` as `[k][n]`.
    pub fn pack(w: &[f32], rows: usize, cols: usize, layout: Layout) -> PackedB {
        assert_eq!(w.len(), rows * cols, "weight of {rows} x {cols} has {} values", w.len());
        let (k, n) = match layout {
            Layout::Transposed => (cols, rows),
            Layout::Plain => (rows, cols),
        };
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut words = vec![0u32; panels * pairs * NR];
        let at = |kk: usize, j: usize| -> u16 {
            if kk >= k || j >= n {
                return 0;
            }
            bf16_bits(match layout {
                Layout::Transposed => w[j * cols + kk],
                Layout::Plain => w[kk * cols + j],
            })
        };
        words
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(q, panel)| match layout {
                // Column-major walk: each column of the panel is a contiguous row of `w`.
                Layout::Transposed => {
                    for jj in 0..NR {
                        let j = q * NR + jj;
                        for p in 0..pairs {
                            panel[p * NR + jj] =
                                at(2 * p, j) as u32 | (at(2 * p + 1, j) as u32) << 16;
                        }
                    }
                }
                // Row-major walk: each pair reads two contiguous stretches of rows of `w`.
                Layout::Plain => {
                    for p in 0..pairs {
                        for jj in 0..NR {
                            let j = q * NR + jj;
                            panel[p * NR + jj] =
                                at(2 * p, j) as u32 | (at(2 * p + 1, j) as u32) << 16;
                        }
                    }
                }
            });
        PackedB { k, n, pairs, words }
    }

    /// The reduced dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    fn panel(&self, q: usize) -> &[u32] {
        &self.words[q * self.pairs * NR..(q + 1) * self.pairs * NR]
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// `a` (`m x k`, row-major) rounded to bf16, one row of `pairs` words each.
fn round_rows(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * pairs];
    out.par_chunks_mut(pairs)
        .zip(a.par_chunks(k))
        .for_each(|(dst, src)| {
            for (p, d) in dst.iter_mut().enumerate() {
                let lo = bf16_bits(src[2 * p]) as u32;
                let hi = src.get(2 * p + 1).map_or(0, |v| bf16_bits(*v) as u32);
                *d = lo | hi << 16;
            }
        });
    out
}

/// A raw pointer to the output that tasks write disjoint tiles of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (row, column) cells of one buffer that outlives the
// parallel loop (see `matmul`).
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared only to hand each task its own cells.
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

/// `out = a * b` with `a` of `m x k` (row-major fp32, rounded to bf16 here) and `b` packed;
/// `out` is `m x n` row-major. Panics unless [`available`] (the caller checks it once).
pub fn matmul(a: &[f32], m: usize, b: &PackedB, out: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "left operand: {} values for {m} x {k}", a.len());
    assert_eq!(out.len(), m * n, "output: {} values for {m} x {n}", out.len());
    assert!(available(), "bf16 matmul called on a CPU without AVX-512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    let rows = round_rows(a, m, k);
    let pairs = b.pairs;
    let panels = b.panels();
    let row_blocks = m.div_ceil(ROW_BLOCK);
    // Enough tasks for every thread, each a block of rows times a run of panels.
    let threads = rayon::current_num_threads().max(1);
    let groups = (4 * threads).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let dst = OutPtr(out.as_mut_ptr());
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let dst = dst;
        let (rb, g) = (task / groups, task % groups);
        let r0 = rb * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(m);
        for q in g * per_group..((g + 1) * per_group).min(panels) {
            let cols = (n - q * NR).min(NR);
            let panel = b.panel(q);
            let mut r = r0;
            while r < r1 {
                let tile_rows = (r1 - r).min(MR);
                // SAFETY: `available()` was checked above; the tile reads rows `r..r+tile_rows`
                // of `rows` (each `pairs` words) and one panel of `pairs * NR` words, and writes
                // `tile_rows x cols` cells starting at (r, q * NR) of the `m x n` output, which no
                // other task writes.
                #[allow(unsafe_code)]
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    x86::tile(
                        rows.as_ptr().add(r * pairs),
                        pairs,
                        tile_rows,
                        panel.as_ptr(),
                        dst.0.add(r * n + q * NR),
                        n,
                        cols,
                    );
                }
                r += tile_rows;
            }
        }
    });
}

/// The same product one multiply-add at a time in fp32, from the same bf16-rounded inputs (the
/// kernel's specification; the tests compare against it).
pub fn reference(a: &[f32], m: usize, b: &PackedB, out: &mut [f32]) {
    let (k, n, pairs) = (b.k, b.n, b.pairs);
    assert_eq!(a.len(), m * k);
    assert_eq!(out.len(), m * n);
    let rows = round_rows(a, m, k);
    for r in 0..m {
        for j in 0..n {
            let panel = b.panel(j / NR);
            let mut s = 0f32;
            for p in 0..pairs {
                let x = rows[r * pairs + p];
                let y = panel[p * NR + j % NR];
                s += bf16_value(x as u16) * bf16_value(y as u16)
                    + bf16_value((x >> 16) as u16) * bf16_value((y >> 16) as u16);
            }
            out[r * n + j] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// One tile: `rows` (1..=MR) rows of `a` (each `pairs` words, consecutive) times one panel,
    /// into the `rows x cols` cells at `c` (row stride `ldc`).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512-BF16; `a` holds `rows * pairs` words, `panel` holds
    /// `pairs * NR` words, and `c` is writable for `rows` rows of `cols` (<= NR) cells.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: *const u32,
        pairs: usize,
        rows: usize,
        panel: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        debug_assert!(rows >= 1 && rows <= MR && cols >= 1 && cols <= NR);
        // Rows past the last reuse it: computed, never stored.
        let row = |i: usize| a.add(i.min(rows - 1) * pairs);
        let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
        let (a4, a5, a6, a7) = (row(4), row(5), row(6), row(7));
        let z = _mm512_setzero_ps();
        let mut acc = [[z; 2]; MR];
        let bc = |p: *const u32| -> __m512bh { std::mem::transmute(_mm512_set1_epi32(*p as i32)) };
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR).cast()));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16).cast()));
            let x = [
                bc(a0.add(p)),
                bc(a1.add(p)),
                bc(a2.add(p)),
                bc(a3.add(p)),
                bc(a4.add(p)),
                bc(a5.add(p)),
                bc(a6.add(p)),
                bc(a7.add(p)),
            ];
            for i in 0..MR {
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x[i], b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x[i], b1);
            }
        }
        if cols == NR {
            for (i, v) in acc.iter().enumerate().take(rows) {
                let dst = c.add(i * ldc);
                _mm512_storeu_ps(dst, v[0]);
                _mm512_storeu_ps(dst.add(16), v[1]);
            }
        } else {
            let m0: __mmask16 = if cols >= 16 { 0xFFFF } else { (1u16 << cols) - 1 };
            let m1: __mmask16 = if cols > 16 { ((1u32 << (cols - 16)) - 1) as u16 } else { 0 };
            for (i, v) in acc.iter().enumerate().take(rows) {
                let dst = c.add(i * ldc);
                _mm512_mask_storeu_ps(dst, m0, v[0]);
                _mm512_mask_storeu_ps(dst.add(16), m1, v[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_value(bf16_bits(1.0)), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
    }

    /// Both layouts, ragged shapes (odd k, n off the panel, m off the tile), against the
    /// reference and against the fp32 product within bf16's rounding.
    #[test]
    fn kernel_matches_the_reference_on_ragged_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (3, 7, 5), (8, 64, 32), (13, 33, 47), (70, 130, 97)] {
            let a = values(m * k, 1 + m as u32);
            let w = values(n * k, 7 + n as u32);
            for layout in [Layout::Transposed, Layout::Plain] {
                // Transposed: w is [n][k]; Plain: the same numbers read as [k][n].
                let (rows, cols) = match layout {
                    Layout::Transposed => (n, k),
                    Layout::Plain => (k, n),
                };
                let b = PackedB::pack(&w, rows, cols, layout);
                let mut want = vec![0f32; m * n];
                reference(&a, m, &b, &mut want);
                // fp32 product of the unrounded inputs: bf16 keeps 8 bits, so each term is off
                // by at most ~2^-8 relative; over k terms of size <= 1 the sum by <= k * 2^-7.
                for r in 0..m {
                    for j in 0..n {
                        let exact: f32 = (0..k)
                            .map(|kk| {
                                let wv = match layout {
                                    Layout::Transposed => w[j * k + kk],
                                    Layout::Plain => w[kk * n + j],
                                };
                                a[r * k + kk] * wv
                            })
                            .sum();
                        let got = want[r * n + j];
                        assert!(
                            (exact - got).abs() <= k as f32 / 128.0,
                            "{m}x{k}x{n} {layout:?} ({r},{j}): {got} vs fp32 {exact}"
                        );
                    }
                }
                if !available() {
                    continue;
                }
                let mut got = vec![f32::NAN; m * n];
                matmul(&a, m, &b, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Same products; only the order of the fp32 additions differs.
                    assert!(
                        (g - w).abs() <= 1e-5 * k as f32,
                        "{m}x{k}x{n} {layout:?} cell {i}: kernel {g}, reference {w}"
                    );
                }
            }
        }
    }
}
