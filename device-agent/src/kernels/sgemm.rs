//! fp32 products with a frozen weight read where it lies, never packed.
//!
//! The `gemm` crate (behind flex's matmul and [`super::flex_matmul`]) copies both operands of
//! every product into panels of its own. For a frozen weight that is the same copy product
//! after product, and with the few dozen rows of a simulated device's batch it is a large share
//! of the work: the `gemm` crate's packing was 19% of the simulator's fp32 real mode (flat
//! profile on Zen 5, session 31). A projection's weight is already in one of two forms a kernel
//! can stream as it is:
//!
//! - [`Layout::Plain`] (`out = a w`, `w` `[k][n]`: a projection's forward, the tied head's input
//!   gradient). A row of `w` is a contiguous run of output columns. A micro-tile of [`MR`] rows
//!   by [`NV`] vectors of columns broadcasts one value of each of its rows of `a` and multiplies it
//!   into the row of `w` at that reduced index (the outer-product form), reading `w` at its own
//!   row stride. The reduced dimension is taken [`KC`] at a time, so a panel's slab (`KC` rows of
//!   `NV` vectors, 24 KiB) stays in L1 while a task's rows pass over it; a ragged last panel is copied
//!   into a zero-padded slab, a ragged tile of the output goes through a small buffer.
//! - [`Layout::Transposed`] (`out = a w^T`, `w` `[n][k]`: an input gradient, the tied head's
//!   logits). Each output is the dot product of a row of `a` with a row of `w`, both contiguous.
//!   A micro-tile of [`DR`] rows of `a` by [`DC`] rows of `w` keeps `DR x DC` vector
//!   accumulators over the whole reduced dimension and adds up each one's lanes at the end.
//!   Tasks take [`W_BLOCK`] rows of `w` (a block that stays in L2) by [`ROW_BLOCK`] rows of `a`.
//!
//! Both are written for AVX2 with FMA (8 lanes) and AVX-512F (16 lanes), chosen at run time by
//! [`crate::cpu::Isa`] (which `FEDSPINE_ISA` can cap); elsewhere [`Kernel::detect`] gives none
//! and callers keep flex's product. Each output cell is summed by one task in a fixed order, so a
//! product gives the same bits however rayon schedules it (not the `gemm` crate's bits: its sums
//! run in another order; the tests hold both to an fp64 reference).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused, unused_unsafe))]

use burn::backend::Flex;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::{Layout, OutPtr};

/// Rows of `a` per outer-product tile.
pub const MR: usize = 4;
/// Vectors of output columns per outer-product tile.
pub const NV: usize = 3;
/// Reduced indices ahead of the current one whose panel row an outer-product tile prefetches
/// (the rows are a stride apart, which the hardware's stream prefetch follows poorly).
const PREFETCH_ROWS: usize = 8;
/// Reduced indices per pass of the outer-product tiles, in 8-lane vectors' terms (a panel's slab
/// is `KC x NV x 8` floats, 24 KiB; 16-lane panels take half as many rows).
pub const KC: usize = 256;
/// Rows of `a` per dot-product tile.
pub const DR: usize = 4;
/// Rows of `w` per dot-product tile.
pub const DC: usize = 3;
/// Rows of `a` one task takes (a multiple of [`MR`] and [`DR`]).
const ROW_BLOCK: usize = 96;
/// Rows of `w` one dot-product task takes (a multiple of [`DC`]).
const W_BLOCK: usize = 48;

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 16-lane AVX-512F.
    Avx512,
    /// 8-lane AVX2 with FMA.
    Avx2,
}

impl Kernel {
    /// The kernel this CPU runs (capped by `FEDSPINE_ISA`), or none: then callers keep the
    /// `gemm` crate's product.
    pub fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            match crate::cpu::Isa::detect() {
                crate::cpu::Isa::Avx512 => Some(Kernel::Avx512),
                crate::cpu::Isa::Avx2Fma => Some(Kernel::Avx2),
                _ => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// Every kernel this CPU can run, widest first (the tests run each).
    pub fn all_usable() -> Vec<Kernel> {
        match Kernel::detect() {
            Some(Kernel::Avx512) => vec![Kernel::Avx512, Kernel::Avx2],
            Some(Kernel::Avx2) => vec![Kernel::Avx2],
            None => Vec::new(),
        }
    }

    /// fp32 lanes of one vector.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 => 8,
        }
    }

    /// Reduced indices per pass: a panel's slab, 24 KiB, stays in L1.
    fn pass(self) -> usize {
        KC * 8 / self.lanes()
    }

    /// Output columns of an outer-product tile ([`NV`] vectors).
    fn panel(self) -> usize {
        NV * self.lanes()
    }
}

/// Rows of `x` from which the frozen products go back to the `gemm` crate: its copy of the weight
/// is then spread over enough rows that the two are at parity (`cargo bench -p device-agent
/// --bench sgemm -- rows 64,128,256` on Zen 1: 1.06-1.77x at 64 rows, 0.86-1.19x at 128,
/// 0.90-1.19x at 256; 1.23-2.55x at 32), and keeping the `gemm` crate there keeps the training
/// step's and a prompt's products as they were, bit for bit.
pub const IN_PLACE_BELOW_ROWS: usize = 128;

/// Rows of `x` below which this CPU's frozen fp32 products read the weight in place
/// ([`IN_PLACE_BELOW_ROWS`]); `None` where it has no kernel for them and every product goes to
/// the `gemm` crate. What the simulator's time model records of the agent it calibrates.
pub fn in_place_below_rows() -> Option<usize> {
    Kernel::detect().map(|_| IN_PLACE_BELOW_ROWS)
}

/// `a w` (`layout` Plain, `w` `rows x cols` read as `[k][n]`) or `a w^T` (Transposed, `w` read as
/// `[n][k]`) for `a` `[m][k]`, all row-major, on this CPU's kernel; `None` where it has none or
/// for [`IN_PLACE_BELOW_ROWS`] rows or more.
pub fn product(
    a: &[f32],
    m: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Option<Vec<f32>> {
    if m >= IN_PLACE_BELOW_ROWS {
        return None;
    }
    Some(product_on(Kernel::detect()?, a, m, w, rows, cols, layout))
}

/// [`product`] on a given kernel (which this CPU must run: [`Kernel::all_usable`]).
pub fn product_on(
    kernel: Kernel,
    a: &[f32],
    m: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Vec<f32> {
    assert!(
        Kernel::all_usable().contains(&kernel),
        "fp32 product on {kernel:?}, which this CPU does not run"
    );
    assert_eq!(
        w.len(),
        rows * cols,
        "weight of {rows} x {cols} has {} values",
        w.len()
    );
    let (k, n) = layout.reduced_and_out(rows, cols);
    assert_eq!(
        a.len(),
        m * k,
        "left operand of {m} x {k} has {} values",
        a.len()
    );
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let dst = OutPtr::new(out.as_mut_ptr());
    match layout {
        Layout::Plain => plain(kernel, a, m, k, w, n, dst),
        Layout::Transposed => transposed(kernel, a, m, k, w, n, dst),
    }
    out
}

/// [`product`] of untracked flex f32 matrices: `x w` (`layout` Plain, `w` `[k, n]`) or `x w^T`
/// (Transposed, `w` `[n, k]`); `None` for autodiff tensors, another backend or dtype, a CPU
/// without the kernels, [`IN_PLACE_BELOW_ROWS`] rows of `x` or more, or a weight that is not
/// held contiguously (copying it for one product would cost more than the `gemm` crate's
/// packing saved).
pub fn matmul(x: &Tensor<2>, w: &Tensor<2>, layout: Layout) -> Option<Tensor<2>> {
    if x.dims()[0] >= IN_PLACE_BELOW_ROWS {
        return None;
    }
    matmul_on(Kernel::detect()?, x, w, layout)
}

/// [`matmul`] on a given kernel at any number of rows (the bench compares the two products at
/// every size).
pub fn matmul_on(
    kernel: Kernel,
    x: &Tensor<2>,
    w: &Tensor<2>,
    layout: Layout,
) -> Option<Tensor<2>> {
    let fw = w.clone().try_into_primitive::<Flex>().ok()?;
    if w.is_autodiff() || w.dtype() != DType::F32 || !fw.is_contiguous() {
        return None;
    }
    let fx = super::flex_f32(x)?;
    let ([m, k], [rows, cols]) = (x.dims(), w.dims());
    let (wk, n) = layout.reduced_and_out(rows, cols);
    if wk != k {
        return None;
    }
    let out = product_on(
        kernel,
        super::slice(&fx),
        m,
        super::slice(&fw),
        rows,
        cols,
        layout,
    );
    Some(super::wrap(out, [m, n]))
}

/// Tasks of `blocks` blocks of rows by groups of `units` column units: enough for every thread.
/// Returns (groups, units per group).
fn split(blocks: usize, units: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let groups = (8 * threads).div_ceil(blocks).clamp(1, units);
    let per_group = units.div_ceil(groups);
    (units.div_ceil(per_group), per_group)
}

/// `out = a w` with `w` `[k][n]` read in place; every cell of the `m x n` output at `dst` is
/// written, by one task.
fn plain(kernel: Kernel, a: &[f32], m: usize, k: usize, w: &[f32], n: usize, dst: OutPtr) {
    let nr = kernel.panel();
    let panels = n.div_ceil(nr);
    let row_blocks = m.div_ceil(ROW_BLOCK);
    let (groups, per_group) = split(row_blocks, panels);
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let (r0, r1) = (rb * ROW_BLOCK, ((rb + 1) * ROW_BLOCK).min(m));
        let (q0, q1) = (g * per_group, ((g + 1) * per_group).min(panels));
        // A ragged last panel's slab, zero-padded to the full width; a ragged tile's cells.
        let mut slab = Vec::new();
        let mut cell_buf = vec![0f32; MR * nr];
        let pass = kernel.pass();
        for p0 in (0..k).step_by(pass) {
            let kc = pass.min(k - p0);
            for q in q0..q1 {
                let c0 = q * nr;
                let cols = nr.min(n - c0);
                let (b, ldb) = if cols == nr {
                    (&w[p0 * n + c0..], n)
                } else {
                    slab.clear();
                    slab.resize(kc * nr, 0.0);
                    for (p, row) in slab.chunks_exact_mut(nr).enumerate() {
                        let src = (p0 + p) * n + c0;
                        row[..cols].copy_from_slice(&w[src..src + cols]);
                    }
                    (&slab[..], nr)
                };
                let mut r = r0;
                while r < r1 {
                    let rows = MR.min(r1 - r);
                    let lhs = &a[r * k + p0..];
                    // The cells (r..r + rows, c0..c0 + cols) of the `m x n` output: this task's
                    // alone and inside the buffer `dst` points into (what the writes below and
                    // `outer_tile` rely on).
                    let c = dst.at(r * n + c0);
                    if cols == nr {
                        outer_tile(kernel, lhs, k, rows, kc, b, ldb, c, n, p0 > 0);
                    } else {
                        // Through a full-width buffer: the tile stores whole vectors.
                        let cells = cell_buf.as_mut_ptr();
                        for i in 0..rows {
                            // SAFETY: row `i` of the tile's own cells (above), `cols` of them;
                            // `cell_buf` holds `MR` rows of `nr`.
                            #[allow(unsafe_code)]
                            unsafe {
                                std::ptr::copy_nonoverlapping(c.add(i * n), cells.add(i * nr), cols)
                            };
                        }
                        outer_tile(kernel, lhs, k, rows, kc, b, ldb, cells, nr, p0 > 0);
                        for i in 0..rows {
                            // SAFETY: as above.
                            #[allow(unsafe_code)]
                            unsafe {
                                std::ptr::copy_nonoverlapping(cells.add(i * nr), c.add(i * n), cols)
                            };
                        }
                    }
                    r += rows;
                }
            }
        }
    });
}

/// One outer-product tile: `rows` (1..=MR) rows of `a` (row stride `lda`, from the pass's first
/// reduced index) times `kc` rows of an [`NV`]-vector panel `b` (row stride `ldb`), into the
/// `rows x panel` cells at `c` (row stride `ldc`), added to them when `add`.
#[allow(clippy::too_many_arguments)]
fn outer_tile(
    kernel: Kernel,
    a: &[f32],
    lda: usize,
    rows: usize,
    kc: usize,
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let nr = kernel.panel();
    assert!((1..=MR).contains(&rows) && a.len() > (rows - 1) * lda + kc - 1);
    assert!(b.len() >= (kc - 1) * ldb + nr);
    // SAFETY: the kernel is this CPU's (checked by `product_on`); the reads stay inside `a` and
    // `b` (checked above); `c` holds `rows` rows of `nr` cells at stride `ldc` (the callers).
    #[allow(unsafe_code)]
    unsafe {
        #[cfg(target_arch = "x86_64")]
        match kernel {
            Kernel::Avx512 => {
                x86::outer_avx512(a.as_ptr(), lda, rows, kc, b.as_ptr(), ldb, c, ldc, add)
            }
            Kernel::Avx2 => {
                x86::outer_avx2(a.as_ptr(), lda, rows, kc, b.as_ptr(), ldb, c, ldc, add)
            }
        }
    }
}

/// `out = a w^T` with `w` `[n][k]` read in place: dot products of rows.
fn transposed(kernel: Kernel, a: &[f32], m: usize, k: usize, w: &[f32], n: usize, dst: OutPtr) {
    let row_blocks = m.div_ceil(ROW_BLOCK);
    let w_blocks = n.div_ceil(W_BLOCK);
    let (groups, per_group) = split(row_blocks, w_blocks);
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let (r0, r1) = (rb * ROW_BLOCK, ((rb + 1) * ROW_BLOCK).min(m));
        let (j0, j1) = (
            g * per_group * W_BLOCK,
            ((g + 1) * per_group * W_BLOCK).min(n),
        );
        for wb in (j0..j1).step_by(W_BLOCK) {
            let wend = (wb + W_BLOCK).min(j1);
            let mut r = r0;
            while r < r1 {
                let rows = DR.min(r1 - r);
                let mut j = wb;
                while j < wend {
                    let wrows = DC.min(wend - j);
                    // SAFETY: the cells (r..r + rows, j..j + wrows) of the `m x n` output are
                    // this task's alone; the tile reads `rows` rows of `a` and `wrows` rows of
                    // `w`, each `k` values, inside the slices (asserted).
                    #[allow(unsafe_code)]
                    unsafe {
                        assert!((r + rows) * k <= a.len() && (j + wrows) * k <= w.len());
                        let (ap, wp, c) = (
                            a.as_ptr().add(r * k),
                            w.as_ptr().add(j * k),
                            dst.at(r * n + j),
                        );
                        #[cfg(target_arch = "x86_64")]
                        match kernel {
                            Kernel::Avx512 => x86::dot_avx512(ap, rows, wp, wrows, k, c, n),
                            Kernel::Avx2 => x86::dot_avx2(ap, rows, wp, wrows, k, c, n),
                        }
                    }
                    j += wrows;
                }
                r += rows;
            }
        }
    });
}

/// The same products one cell at a time in f64, for the tests.
pub fn reference(
    a: &[f32],
    m: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Vec<f32> {
    let (k, n) = layout.reduced_and_out(rows, cols);
    let at = |p: usize, j: usize| match layout {
        Layout::Plain => w[p * n + j],
        Layout::Transposed => w[j * k + p],
    };
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|p| a[r * k + p] as f64 * at(p, j) as f64).sum();
            out[r * n + j] = s as f32;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{DC, DR, MR, NV, PREFETCH_ROWS};
    use std::arch::x86_64::*;

    /// The outer-product tile for one vector type: `$lanes`-wide vectors, [`NV`] per panel row.
    macro_rules! outer_tile {
        ($name:ident, $feature:literal, $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident, $add:ident, $lanes:literal) => {
            /// # Safety
            /// The CPU has the target features; `a` holds `rows` rows at stride `lda` with `kc`
            /// values each, `b` holds `kc` rows at stride `ldb` with [`NV`] vectors each, and `c`
            /// is writable for `rows` rows of [`NV`] vectors at stride `ldc`.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                a: *const f32,
                lda: usize,
                rows: usize,
                kc: usize,
                b: *const f32,
                ldb: usize,
                c: *mut f32,
                ldc: usize,
                add: bool,
            ) {
                // Rows past the last reuse it: computed, never stored.
                let row = |i: usize| a.add(i.min(rows - 1) * lda);
                let ar = [row(0), row(1), row(2), row(3)];
                let mut acc = [[$zero(); NV]; MR];
                for p in 0..kc {
                    let bp = b.add(p * ldb);
                    // A hint only: an address past the weight is never dereferenced.
                    let ahead = bp.wrapping_add(PREFETCH_ROWS * ldb).cast::<i8>();
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                    let bv = [$load(bp), $load(bp.add($lanes)), $load(bp.add(2 * $lanes))];
                    for i in 0..MR {
                        let x = $set1(*ar[i].add(p));
                        for v in 0..NV {
                            acc[i][v] = $fma(x, bv[v], acc[i][v]);
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate().take(rows) {
                    let dst = c.add(i * ldc);
                    for (v, &x) in row.iter().enumerate() {
                        let out = dst.add(v * $lanes);
                        $store(out, if add { $add($load(out), x) } else { x });
                    }
                }
            }
        };
    }

    outer_tile!(
        outer_avx2,
        "avx2,fma",
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        8
    );
    outer_tile!(
        outer_avx512,
        "avx512f",
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        16
    );

    /// The lanes of an 8-lane vector added up in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The lanes of a 16-lane vector added up in a fixed order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    /// The dot-product tile for one vector type.
    macro_rules! dot_tile {
        ($name:ident, $feature:literal, $zero:ident, $load:ident, $fma:ident, $hsum:ident, $lanes:literal) => {
            /// `c[i][j] = dot(a_i, w_j)` for `rows` (1..=DR) rows of `a` and `wrows` (1..=DC)
            /// rows of `w`, each `k` contiguous values; `c` has row stride `ldc`.
            ///
            /// # Safety
            /// The CPU has the target features; `a` holds `rows * k` values, `w` holds `wrows *
            /// k`, and `c` is writable for `rows` rows of `wrows` cells at stride `ldc`.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                a: *const f32,
                rows: usize,
                w: *const f32,
                wrows: usize,
                k: usize,
                c: *mut f32,
                ldc: usize,
            ) {
                let ar = |i: usize| a.add(i.min(rows - 1) * k);
                let wr = |j: usize| w.add(j.min(wrows - 1) * k);
                let (a_rows, w_rows) = ([ar(0), ar(1), ar(2), ar(3)], [wr(0), wr(1), wr(2)]);
                let mut acc = [[$zero(); DC]; DR];
                let body = k / $lanes * $lanes;
                let mut p = 0;
                while p < body {
                    let wv = [
                        $load(w_rows[0].add(p)),
                        $load(w_rows[1].add(p)),
                        $load(w_rows[2].add(p)),
                    ];
                    for i in 0..DR {
                        let av = $load(a_rows[i].add(p));
                        for j in 0..DC {
                            acc[i][j] = $fma(av, wv[j], acc[i][j]);
                        }
                    }
                    p += $lanes;
                }
                for i in 0..rows {
                    for j in 0..wrows {
                        let mut s = $hsum(acc[i][j]);
                        for q in body..k {
                            s = (*a_rows[i].add(q)).mul_add(*w_rows[j].add(q), s);
                        }
                        *c.add(i * ldc + j) = s;
                    }
                }
            }
        };
    }

    dot_tile!(
        dot_avx2,
        "avx2,fma",
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum256,
        8
    );
    dot_tile!(
        dot_avx512,
        "avx512f",
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        hsum512,
        16
    );
}

#[cfg(test)]
mod tests;
