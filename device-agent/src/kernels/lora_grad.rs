//! The products of a LoRA branch's backward pass that read a large matrix, in one pass over it.
//!
//! For `y = base + (x A)(s B)` with `x` `[n, in]`, `A` `[in, r]` and `B` `[r, out]`, the output
//! gradient `dy` `[n, out]` gives `d(xA) = dy (sB)^T` (`[n, r]`) and `d(sB) = (xA)^T dy`
//! (`[r, out]`); then `d(xA)` gives `dA = x^T d(xA)` (`[in, r]`). Through the `gemm` crate each
//! of these copies the large operand (`dy` or `x`) into panels of its own before a few
//! multiply-adds per value (a rank of 4-64), and `dy` is copied twice: those products ran at
//! 44-48 GFLOP/s in the training step's profile, a third of the frozen products' rate.
//!
//! Here one pass over a large row-major `m` `[n, c]` forms `p = m w` for a thin `w` `[c, r]` and
//! `g = m^T s` for a thin `s` `[n, r]` together: each value `m[i][k]` is broadcast once and
//! multiplied into the rank-wide rows `w[k]` (adding into `p[i]`) and `s[i]` (adding into
//! `g[k]`), ranks padded with zeros to whole vectors. A tile keeps `MR` rows of `p` and `KG`
//! rows of `g` in registers while it walks `MR` rows of `m` `KG` columns at a time; each `g[k]`
//! row gets one multiply-add per row of `m`, so `KG` rows of it (times the vectors of a rank)
//! are the independent chains that keep the multiply-add units busy.
//!
//! The work is cut into fixed blocks of rows and columns (never by thread count), each block
//! summing in a fixed order and the blocks' partial sums added in block order afterwards: a
//! product has the same bits on any number of threads. They are not the `gemm` crate's bits
//! (another order of sums); the tests hold both to an f64 reference.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused, unused_unsafe))]

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;
use rayon::prelude::*;

use super::sgemm::Kernel;
use super::{contiguous_f32 as contiguous, f32_values as f32s};

/// The most rows of `m` one task takes (blocks share the rows evenly, whole tiles each).
const ROW_BLOCK: usize = 256;
/// The most rows of `m` a tile takes.
const MAX_TILE_ROWS: usize = 8;
/// Tasks a product is cut into where it has the rows for fewer (columns are then split too).
const TASKS: usize = 4;
/// The narrowest column block.
const MIN_COL_BLOCK: usize = 128;
/// Multiply-adds (padded) below which a product stays on the calling thread, in one block.
const SERIAL_MACS: usize = 1 << 20;
/// The widest rank taken. Past it the `gemm` crate was at parity or faster (`cargo bench -p
/// device-agent --bench sgemm -- lora`: `x^T dz` of the joined q/k/v factors, rank 48, 0.74-0.91x
/// on the AVX-512 host of session 37); ranks 32 and 64 were not measured.
pub const MAX_RANK: usize = 16;

/// Rows and columns of a LoRA product's large operand (`dy` or `x`) from which its backward
/// products go through this one pass instead of the `gemm` crate: below them the `gemm` crate
/// was as fast or faster (`cargo bench -p device-agent --bench sgemm -- lora`, session 37 on
/// the AVX-512 host: 0.53-0.88x at 256 rows but for the narrowest, 0.65x for the 192-wide `dy`
/// of the k and v projections at 1024 rows, 1.44-1.71x for the 576- and 1536-wide ones).
pub const ONE_PASS_ROWS: usize = 512;
pub const ONE_PASS_COLS: usize = 512;

/// A LoRA backward's products in one pass over the contiguous `m` `[n, c]` with the thin `s`
/// `[n, r]`: with `sb` `[r, c]`, `(m sb^T, s^T m)` (a `B` product's `dlow` and `dsb`); without,
/// `(None, m^T s)` (an `A` product's `da`). `None` below [`ONE_PASS_ROWS`] rows or
/// [`ONE_PASS_COLS`] columns or where
/// there is no tile.
pub(crate) fn flex_grads(
    m: &FlexTensor,
    s: &FlexTensor,
    sb: Option<&FlexTensor>,
) -> Option<(Option<FlexTensor>, FlexTensor)> {
    let (ms, ss) = (m.layout().shape(), s.layout().shape());
    if ms.num_dims() != 2
        || ss.num_dims() != 2
        || ms[0] != ss[0]
        || ms[0] < ONE_PASS_ROWS
        || ms[1] < ONE_PASS_COLS
    {
        return None;
    }
    let (n, c, r) = (ms[0], ms[1], ss[1]);
    let s = contiguous(s.clone());
    let new = |v: Vec<f32>, dims: [usize; 2]| FlexTensor::from_data(TensorData::new(v, dims));
    match sb {
        Some(sb) => {
            let sb = contiguous(sb.clone());
            let (dlow, dsb) = b_grads(f32s(m), n, c, f32s(&s), f32s(&sb), r)?;
            Some((Some(new(dlow, [n, r])), new(dsb, [r, c])))
        }
        None => {
            let da = a_grad(f32s(m), n, c, f32s(&s), r)?;
            Some((None, new(da, [c, r])))
        }
    }
}

/// The gradients of a LoRA `B` product `y = base + low sb`: `(dlow, dsb) = (dy sb^T, low^T dy)`
/// for `dy` `[n, c]`, `low` `[n, r]` and `sb` `[r, c]`, all row-major, in one pass over `dy`.
/// `None` where this CPU has no kernel or the rank is wider than the tiles take (then the callers
/// keep the `gemm` crate's products).
pub fn b_grads(
    dy: &[f32],
    n: usize,
    c: usize,
    low: &[f32],
    sb: &[f32],
    r: usize,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (p, g) = grads_on(Kernel::detect()?, dy, n, c, low, Some(sb), r)?;
    Some((p.expect("p is formed where w is given"), g))
}

/// The gradient of a LoRA `A` product `z = x a`: `da = x^T dz` (`[c, r]`) for `x` `[n, c]` and
/// `dz` `[n, r]`, row-major; `None` as for [`b_grads`].
pub fn a_grad(x: &[f32], n: usize, c: usize, dz: &[f32], r: usize) -> Option<Vec<f32>> {
    grads_on(Kernel::detect()?, x, n, c, dz, None, r).map(|(_, g)| g)
}

/// Both products on a given kernel (one this CPU runs: [`Kernel::all_usable`]): `p = m w^T`
/// (`[n, r]`, when `w` `[r, c]` is given) and `g = s^T m`, given as `[r, c]` when `w` is (the
/// layout of `w`: [`b_grads`]) and as its transpose `[c, r]` otherwise ([`a_grad`]).
pub fn grads_on(
    kernel: Kernel,
    m: &[f32],
    n: usize,
    c: usize,
    s: &[f32],
    w: Option<&[f32]>,
    r: usize,
) -> Option<(Option<Vec<f32>>, Vec<f32>)> {
    assert!(
        Kernel::all_usable().contains(&kernel),
        "LoRA gradients on {kernel:?}, which this CPU does not run"
    );
    assert_eq!(m.len(), n * c, "m of {n} x {c} has {} values", m.len());
    assert_eq!(s.len(), n * r, "s of {n} x {r} has {} values", s.len());
    if let Some(w) = w {
        assert_eq!(w.len(), r * c, "w of {r} x {c} has {} values", w.len());
    }
    let lanes = kernel.lanes();
    let nv = r.div_ceil(lanes);
    if r == 0 || r > MAX_RANK {
        return None;
    }
    if n == 0 || c == 0 {
        return Some((w.map(|_| vec![0.0; n * r]), vec![0.0; c * r]));
    }
    let ld = nv * lanes;
    // `s` row by row with zero rows past the last: a ragged last tile's missing rows read them,
    // adding nothing to `g` (ragged tiles come only at the end, every row block being a
    // multiple of every tile's rows).
    let mut s_pad = vec![0f32; (n + MAX_TILE_ROWS) * ld];
    for (d, s) in s_pad.chunks_exact_mut(ld).zip(s.chunks_exact(r)) {
        d[..r].copy_from_slice(s);
    }
    // `w` column by column (a row of `ld` per column of `m`).
    let w_pad = w.map(|w| {
        let mut v = vec![0f32; c * ld];
        for (j, row) in w.chunks_exact(c).enumerate() {
            for (k, &x) in row.iter().enumerate() {
                v[k * ld + j] = x;
            }
        }
        v
    });
    // Blocks from the shape alone (the bits must not depend on the thread count): row blocks,
    // and columns split where there are fewer row blocks than tasks.
    let row_blocks = n.div_ceil(ROW_BLOCK);
    let serial = n * c * ld < SERIAL_MACS;
    let col_block = if serial {
        c
    } else {
        c.div_ceil(TASKS.div_ceil(row_blocks)).max(MIN_COL_BLOCK)
    };
    let col_blocks = c.div_ceil(col_block);
    // Rows shared evenly between the row blocks (whole tiles each), so a ragged count does not
    // leave one short block behind the others.
    let row_block = if serial {
        n
    } else {
        n.div_ceil(row_blocks).next_multiple_of(MAX_TILE_ROWS)
    };
    let row_blocks = n.div_ceil(row_block);
    let blk = Block {
        kernel,
        nv,
        ld,
        m,
        n,
        c,
        s: &s_pad,
        w: w_pad.as_deref(),
    };
    let task = |task: usize| {
        let (rb, cb) = (task / col_blocks, task % col_blocks);
        let rows = rb * row_block..((rb + 1) * row_block).min(n);
        let cols = cb * col_block..((cb + 1) * col_block).min(c);
        let mut g = vec![0f32; cols.len() * ld];
        let mut p = vec![0f32; if w.is_some() { rows.len() * ld } else { 0 }];
        blk.run(rows, cols, &mut g, &mut p);
        (g, p)
    };
    let parts: Vec<(Vec<f32>, Vec<f32>)> = if serial {
        vec![task(0)]
    } else {
        (0..row_blocks * col_blocks)
            .into_par_iter()
            .map(task)
            .collect()
    };
    // Partial sums in block order: `g` over the row blocks, `p` over the column blocks.
    let mut g = vec![0f32; c * r];
    let mut p = w.map(|_| vec![0f32; n * r]);
    for rb in 0..row_blocks {
        for cb in 0..col_blocks {
            let (gp, pp) = &parts[rb * col_blocks + cb];
            for (k, row) in gp.chunks_exact(ld).enumerate() {
                let col = cb * col_block + k;
                for (j, &v) in row[..r].iter().enumerate() {
                    // `[r, c]` beside `w`, `[c, r]` otherwise.
                    let at = if w.is_some() {
                        j * c + col
                    } else {
                        col * r + j
                    };
                    g[at] += v;
                }
            }
            if let Some(p) = p.as_mut() {
                let dst = &mut p[rb * row_block * r..];
                for (d, row) in dst.chunks_exact_mut(r).zip(pp.chunks_exact(ld)) {
                    for (d, v) in d.iter_mut().zip(row) {
                        *d += v;
                    }
                }
            }
        }
    }
    Some((p, g))
}

/// One task's operands: the padded `s` (with [`MAX_TILE_ROWS`] zero rows last) and `w`, rows of
/// `ld` values.
struct Block<'a> {
    kernel: Kernel,
    nv: usize,
    ld: usize,
    m: &'a [f32],
    n: usize,
    c: usize,
    s: &'a [f32],
    w: Option<&'a [f32]>,
}

/// Raw operands of one tile, positioned at its first row and column (see the kernels).
#[derive(Clone, Copy)]
struct Tile {
    m: *const f32,
    ldm: usize,
    rows: usize,
    kc: usize,
    s: *const f32,
    w: *const f32,
    g: *mut f32,
    p: *mut f32,
}

impl Block<'_> {
    /// Rows and columns of `m` into the block's `g` (`cols` rows of `ld`) and `p` (`rows` rows of
    /// `ld`, when `w` is given).
    fn run(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        g: &mut [f32],
        p: &mut [f32],
    ) {
        let with_p = self.w.is_some();
        let (mr, kg) = shape(self.kernel, self.nv, with_p);
        let ld = self.ld;
        let kc = cols.len();
        let main = kc / kg * kg;
        assert!(rows.end * self.c <= self.m.len() && cols.end <= self.c);
        assert!(self.s.len() >= (rows.end + MAX_TILE_ROWS) * ld && g.len() == kc * ld);
        assert!(!with_p || p.len() == rows.len() * ld);
        assert!(
            mr <= MAX_TILE_ROWS && (rows.len().is_multiple_of(MAX_TILE_ROWS) || rows.end == self.n)
        );
        let mut i = rows.start;
        while i < rows.end {
            let n_rows = mr.min(rows.end - i);
            for (k0, k1, tail) in [(0, main, false), (main, kc, true)] {
                if k0 == k1 {
                    continue;
                }
                let col = cols.start + k0;
                let w = self.w.map_or(std::ptr::null(), |w| w[col * ld..].as_ptr());
                let t = Tile {
                    m: self.m[i * self.c + col..].as_ptr(),
                    ldm: self.c,
                    rows: n_rows,
                    kc: k1 - k0,
                    s: self.s[i * ld..].as_ptr(),
                    w,
                    g: g[k0 * ld..].as_mut_ptr(),
                    p: if with_p {
                        p[(i - rows.start) * ld..].as_mut_ptr()
                    } else {
                        std::ptr::null_mut()
                    },
                };
                // SAFETY: the kernel is this CPU's (checked by `lora_grads_on`); the tile reads
                // `n_rows` rows of `m` from (i, col) for `k1 - k0` columns, inside `m` (asserted
                // above), the same rows of the padded `s` (or its zero row) and those columns' rows
                // of the padded `w`; it writes its columns' rows of this block's `g` and its rows of
                // this block's `p`, both inside them (asserted above) and this task's alone.
                #[allow(unsafe_code)]
                unsafe {
                    run_tile(self.kernel, self.nv, with_p, tail, t)
                };
            }
            i += n_rows;
        }
    }
}

/// The tiles, one line each: kernel, its tile function, with `p` or not, padded rank in vectors
/// => rows of `m` per tile (`MR`), columns per group (`KG`). The register budget (32 vectors for
/// AVX-512, 16 for AVX2) holds a tile's `p` rows (`MR * nv`), its `g` and `w` rows (`KG * nv`
/// each) and a row of `s` (`nv`); `KG * nv` chains of `g` keep the multiply-adds busy.
macro_rules! tiles {
    ($($k:ident, $f:ident, $p:literal, $nv:literal => $mr:literal, $kg:literal;)*) => {
        /// `(MR, KG)` for a kernel, a padded rank of `nv` vectors, with or without `p`.
        fn shape(kernel: Kernel, nv: usize, with_p: bool) -> (usize, usize) {
            match (kernel, with_p, nv) {
                $((Kernel::$k, $p, $nv) => ($mr, $kg),)*
                _ => unreachable!("no tile for {nv} vectors"),
            }
        }

        /// The tile [`shape`] gives, monomorphised; `tail` takes the columns one at a time.
        ///
        /// # Safety
        /// The kernel is this CPU's and `t` is valid as the kernels require.
        #[allow(unsafe_code)]
        unsafe fn run_tile(kernel: Kernel, nv: usize, with_p: bool, tail: bool, t: Tile) {
            #[cfg(target_arch = "x86_64")]
            match (kernel, with_p, nv, tail) {
                $(
                    (Kernel::$k, $p, $nv, false) => x86::$f::<$mr, $nv, $kg, $p>(t),
                    (Kernel::$k, $p, $nv, true) => x86::$f::<$mr, $nv, 1, $p>(t),
                )*
                _ => unreachable!("no tile for {nv} vectors"),
            }
        }
    };
}

tiles! {
    Avx512, tile_avx512, true, 1 => 4, 8;
    Avx512, tile_avx512, false, 1 => 8, 8;
    Avx2, tile_avx2, true, 1 => 4, 4;
    Avx2, tile_avx2, true, 2 => 2, 2;
    Avx2, tile_avx2, false, 1 => 8, 8;
    Avx2, tile_avx2, false, 2 => 8, 4;
}

/// [`grads_on`]'s products one cell at a time in f64, for the tests.
pub fn reference(
    m: &[f32],
    n: usize,
    c: usize,
    s: &[f32],
    w: Option<&[f32]>,
    r: usize,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let dot = |f: &dyn Fn(usize) -> (f32, f32), len: usize| -> f32 {
        (0..len)
            .map(|i| {
                let (a, b) = f(i);
                f64::from(a) * f64::from(b)
            })
            .sum::<f64>() as f32
    };
    let p = w.map(|w| {
        let mut p = vec![0f32; n * r];
        for i in 0..n {
            for j in 0..r {
                p[i * r + j] = dot(&|k| (m[i * c + k], w[j * c + k]), c);
            }
        }
        p
    });
    let mut g = vec![0f32; c * r];
    for k in 0..c {
        for j in 0..r {
            let at = if w.is_some() { j * c + k } else { k * r + j };
            g[at] = dot(&|i| (m[i * c + k], s[i * r + j]), n);
        }
    }
    (p, g)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    /// The tile for one vector type, `$lanes` wide.
    macro_rules! tile {
        ($name:ident, $feature:literal, $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident, $lanes:literal) => {
            /// `MR` rows of `m` (the rows past `t.rows` repeat its last, and meet zero rows of
            /// `s`) by `t.kc` columns, `KG` at a time: `p[i] += sum_k m[i][k] w[k]` (when `P`)
            /// and `g[k] += sum_i m[i][k] s[i]`, rows of `NV` vectors.
            ///
            /// # Safety
            /// The CPU has the target features; `t.m` holds `t.rows` rows at stride `t.ldm` of
            /// `t.kc` values; `t.s` holds `MR` rows, `t.g` (and, when `P`, `t.w`) `t.kc` rows and
            /// `t.p` `t.rows` rows of `NV` vectors, `t.g` and `t.p` writable.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<
                const MR: usize,
                const NV: usize,
                const KG: usize,
                const P: bool,
            >(
                t: Tile,
            ) {
                let ld = NV * $lanes;
                let mrow: [*const f32; MR] =
                    std::array::from_fn(|i| t.m.add(i.min(t.rows - 1) * t.ldm));
                let mut acc = [[$zero(); NV]; MR];
                if P {
                    for (i, row) in acc.iter_mut().enumerate().take(t.rows) {
                        for (v, a) in row.iter_mut().enumerate() {
                            *a = $load(t.p.add(i * ld + v * $lanes));
                        }
                    }
                }
                let mut k = 0;
                while k + KG <= t.kc {
                    let (g, w) = (t.g.add(k * ld), t.w.wrapping_add(k * ld));
                    let mut gk = [[$zero(); NV]; KG];
                    for j in 0..KG {
                        for v in 0..NV {
                            gk[j][v] = $load(g.add(j * ld + v * $lanes));
                        }
                    }
                    for i in 0..MR {
                        let mut sv = [$zero(); NV];
                        for (v, x) in sv.iter_mut().enumerate() {
                            *x = $load(t.s.add(i * ld + v * $lanes));
                        }
                        for j in 0..KG {
                            let x = $set1(*mrow[i].add(k + j));
                            for v in 0..NV {
                                if P {
                                    let wv = $load(w.add(j * ld + v * $lanes));
                                    acc[i][v] = $fma(x, wv, acc[i][v]);
                                }
                                gk[j][v] = $fma(x, sv[v], gk[j][v]);
                            }
                        }
                    }
                    for j in 0..KG {
                        for v in 0..NV {
                            $store(g.add(j * ld + v * $lanes), gk[j][v]);
                        }
                    }
                    k += KG;
                }
                if P {
                    for (i, row) in acc.iter().enumerate().take(t.rows) {
                        for (v, &a) in row.iter().enumerate() {
                            $store(t.p.add(i * ld + v * $lanes), a);
                        }
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
        16
    );
}

#[cfg(test)]
mod tests;
