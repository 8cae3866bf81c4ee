//! Matrix products with bf16 inputs and fp32 accumulation on AVX-512-BF16 (`vdpbf16ps`), for the
//! frozen base's projections: `out[m][n] = sum_k a[m][k] * b[k][n]`, where `a` (activations or
//! output gradients) is rounded to bf16 per call and `b` (a frozen weight) is packed into
//! [`PackedB`], once and kept for a model's own weights ([`super::cache`]), per call otherwise.
//!
//! `vdpbf16ps` multiplies pairs: each of its 16 fp32 lanes adds `x[2i] * y[2i] + x[2i+1] *
//! y[2i+1]`. So `b` is packed in panels of [`NR`] = 32 output columns, and within a panel by pairs
//! of the reduced dimension: one 32-bit word per column holds `b[2p][j]` (low half) and
//! `b[2p+1][j]` (high half), 32 words per pair (two vectors). `a` is rounded row by row into
//! bf16, which in memory is already its pairs (`a[r][2p]`, `a[r][2p+1]` adjacent); the kernel
//! broadcasts one pair of row `r` to every lane and multiplies it into both vectors of the panel.
//! The reduced dimension is padded with zero pairs to a multiple of 16 pairs (the AMX kernel's
//! step; an odd `k` pads half a pair); a ragged last panel with zero columns (stored under a
//! mask); a ragged last group of rows reuses the last row (its results are not stored), and the
//! rounded rows are padded with zero rows to a multiple of 32 for the AMX kernel's loads.
//!
//! A micro-tile is [`MR`] = 8 rows by 32 columns: 16 accumulators, two panel loads and eight
//! broadcasts per pair, over the whole reduced dimension (no blocking along it: the shapes of a
//! 135M-parameter model keep a tile's rows of `a`, at most 8 x 1536 bf16, in L1). Work is split
//! over rayon's threads by blocks of rows and groups of panels.
//!
//! Where the CPU has AMX tiles and Linux permits them, the same packed operands go through
//! [`super::amx`]'s 32 x 32 blocks instead ([`Kernel`], chosen once per process).
//!
//! [`reference`] computes the same products one at a time in fp32 from the same rounded values:
//! the tests hold the SIMD kernel to it, and a machine without the instructions never calls the
//! kernel (the caller runs fp32 instead: [`available`]).
//!
//! The kernels are x86-64 only: elsewhere [`available`] is false, [`matmul`] is never reached,
//! and the code that would drive the kernels compiles without them (hence the `allow` below,
//! for that code's bindings on other architectures).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused, unused_unsafe))]

use rayon::prelude::*;

use super::amx;
use crate::kernels::OutPtr;

/// Output columns per packed panel (two 16-lane vectors; the AMX block's width).
pub const NR: usize = amx::BLOCK_COLS;
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

/// Does this CPU have the instructions the kernel needs, and may our kernels use AVX-512
/// (`FEDSPINE_ISA=avx2|portable` says no: [`crate::cpu`])?
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::Isa::detect() == crate::cpu::Isa::Avx512
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub use crate::kernels::Layout;

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
        PackedB::pack_into(Vec::new(), w, rows, cols, layout)
    }

    /// [`PackedB::pack`] into the allocation of `words`, whose contents are overwritten, never
    /// read: a caller packing weight after weight reuses one buffer ([`PackedB::into_words`])
    /// and pays neither the allocation nor the zeroing again.
    pub fn pack_into(
        mut words: Vec<u32>,
        w: &[f32],
        rows: usize,
        cols: usize,
        layout: Layout,
    ) -> PackedB {
        assert_eq!(
            w.len(),
            rows * cols,
            "weight of {rows} x {cols} has {} values",
            w.len()
        );
        let (k, n) = layout.reduced_and_out(rows, cols);
        let pairs = padded_pairs(k);
        let panels = n.div_ceil(NR);
        set_len(&mut words, panels * pairs * NR);
        // Each panel function writes every word of its panel, padding included.
        words
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(q, panel)| match layout {
                Layout::Transposed => pack_transposed(w, k, n, q, panel),
                Layout::Plain => pack_plain(w, k, n, q, panel),
            });
        PackedB { k, n, pairs, words }
    }

    /// The buffer, for [`PackedB::pack_into`] to reuse.
    pub fn into_words(self) -> Vec<u32> {
        self.words
    }

    /// Bytes of packed words held.
    pub fn bytes(&self) -> usize {
        self.words.len() * std::mem::size_of::<u32>()
    }

    fn panel(&self, q: usize) -> &[u32] {
        &self.words[q * self.pairs * NR..(q + 1) * self.pairs * NR]
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Pairs of the reduced dimension as stored: `k / 2` rounded up, then up to a whole tile step of
/// the AMX kernel (the padding is zeros on both sides, so it adds nothing to any sum).
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(amx::STEP_PAIRS)
}

/// `v` at length `len`, keeping its allocation; new words are zero, old ones keep stale values
/// for the caller to overwrite (only growth pays for zeroing).
fn set_len(v: &mut Vec<u32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    } else {
        v.truncate(len);
    }
}

/// `a` (`m x k`, row-major) rounded to bf16 into `out` (its contents overwritten, never read),
/// one row of [`padded_pairs`] words each, and zero rows up to a multiple of the AMX block's rows
/// (its loads read whole blocks).
fn round_rows_into(out: &mut Vec<u32>, a: &[f32], m: usize, k: usize) {
    let pairs = padded_pairs(k);
    let real = k.div_ceil(2);
    set_len(out, m.next_multiple_of(amx::BLOCK_ROWS) * pairs);
    let (body, pad) = out.split_at_mut(m * pairs);
    pad.fill(0);
    body.par_chunks_mut(pairs * ROUND_ROWS)
        .zip(a.par_chunks(k * ROUND_ROWS))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_mut(pairs).zip(src.chunks(k)) {
                let (d, tail) = d.split_at_mut(real);
                round_row(s, d);
                tail.fill(0);
            }
        });
}

/// [`round_rows_into`] a new buffer.
fn round_rows(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let mut out = Vec::new();
    round_rows_into(&mut out, a, m, k);
    out
}

thread_local! {
    /// A thread's buffers for products that round and pack per call ([`product`]): the rounded
    /// rows and the packed weight. Taken out while in use, so a product that starts while
    /// another waits on the same thread (rayon may run one inside the other's wait) gets fresh
    /// buffers instead of a conflict.
    static SCRATCH: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Rows of `a` rounded by one task.
const ROUND_ROWS: usize = 16;

/// One row rounded to bf16 pairs (`dst` has `src.len().div_ceil(2)` words; an odd length pads
/// the last word's high half with 0).
fn round_row(src: &[f32], dst: &mut [u32]) {
    debug_assert_eq!(dst.len(), src.len().div_ceil(2));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the instructions are present; the kernel reads `src.len() / 32 * 32` values
        // and writes half as many words, both within the slices.
        #[allow(unsafe_code)]
        unsafe {
            done = x86::round_row(src.as_ptr(), src.len(), dst.as_mut_ptr());
        }
    }
    for p in done / 2..dst.len() {
        let lo = bf16_bits(src[2 * p]) as u32;
        let hi = src.get(2 * p + 1).map_or(0, |v| bf16_bits(*v) as u32);
        dst[p] = lo | hi << 16;
    }
}

/// Panel `q` of a `[k][n]` weight (`Layout::Plain`): pair `p` of column `j` is
/// `(w[2p][j], w[2p+1][j])`, two stretches of rows read 16 columns at a time.
fn pack_plain(w: &[f32], k: usize, n: usize, q: usize, panel: &mut [u32]) {
    let j0 = q * NR;
    let cols = (n - j0).min(NR);
    // Pairs past the weight's rows are zero (padding).
    let (panel, pad) = panel.split_at_mut(k.div_ceil(2) * NR);
    pad.fill(0);
    #[cfg(target_arch = "x86_64")]
    if available() {
        for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
            let r0 = &w[2 * p * n + j0..][..cols];
            let r1 = (2 * p + 1 < k).then(|| &w[(2 * p + 1) * n + j0..][..cols]);
            // SAFETY: the instructions are present; the kernel reads `cols` (<= NR) values of
            // each row slice and writes NR words of `out`.
            #[allow(unsafe_code)]
            unsafe {
                x86::interleave_pair(r0, r1, out);
            }
        }
        return;
    }
    for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
        out[cols..].fill(0);
        for (jj, o) in out.iter_mut().enumerate().take(cols) {
            let j = j0 + jj;
            let lo = bf16_bits(w[2 * p * n + j]) as u32;
            let hi = if 2 * p + 1 < k {
                bf16_bits(w[(2 * p + 1) * n + j]) as u32
            } else {
                0
            };
            *o = lo | hi << 16;
        }
    }
}

/// Panel `q` of an `[n][k]` weight (`Layout::Transposed`): pair `p` of column `j` is
/// `(w[j][2p], w[j][2p+1])`, adjacent in row `j`; each row is rounded whole, then the panel's
/// rows are turned into its pairs.
fn pack_transposed(w: &[f32], k: usize, n: usize, q: usize, panel: &mut [u32]) {
    // Pairs past the weight's columns are zero (padding), as are columns past `n`.
    let pairs = k.div_ceil(2);
    let j0 = q * NR;
    let cols = (n - j0).min(NR);
    let mut rows = vec![0u32; cols * pairs];
    for (jj, dst) in rows.chunks_exact_mut(pairs).enumerate() {
        round_row(&w[(j0 + jj) * k..][..k], dst);
    }
    let (panel, pad) = panel.split_at_mut(pairs * NR);
    pad.fill(0);
    for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
        let (out, rest) = out.split_at_mut(cols);
        rest.fill(0);
        for (jj, o) in out.iter_mut().enumerate() {
            *o = rows[jj * pairs + p];
        }
    }
}

/// The micro-kernel that runs the bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles, `tdpbf16ps` ([`super::amx`]): 32 x 32 blocks.
    AmxTiles,
    /// AVX-512-BF16 `vdpbf16ps`: 8 x 32 tiles.
    Avx512Bf16,
}

impl Kernel {
    /// The fastest kernel this process may use, `None` without AVX-512-BF16 (see [`available`]).
    pub fn detect() -> Option<Kernel> {
        if !available() {
            None
        } else if amx::usable() {
            Some(Kernel::AmxTiles)
        } else {
            Some(Kernel::Avx512Bf16)
        }
    }

    /// Every kernel this process may use (the tests run each).
    pub fn all_usable() -> Vec<Kernel> {
        match Kernel::detect() {
            None => vec![],
            Some(Kernel::AmxTiles) => vec![Kernel::AmxTiles, Kernel::Avx512Bf16],
            Some(Kernel::Avx512Bf16) => vec![Kernel::Avx512Bf16],
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernel::AmxTiles => "AMX tiles (tdpbf16ps)",
            Kernel::Avx512Bf16 => "AVX-512-BF16 (vdpbf16ps)",
        })
    }
}

/// `out = a * b` with `a` of `m x k` (row-major fp32, rounded to bf16 here) and `b` packed;
/// `out` is `m x n` row-major, on the fastest kernel here. Panics unless [`available`] (the
/// caller checks it once).
pub fn matmul(a: &[f32], m: usize, b: &PackedB, out: &mut [f32]) {
    let kernel = Kernel::detect().expect("bf16 matmul called on a CPU without AVX-512-BF16");
    matmul_on(kernel, a, m, b, out);
}

/// [`matmul`] on a given kernel. Panics if this process may not use it.
pub fn matmul_on(kernel: Kernel, a: &[f32], m: usize, b: &PackedB, out: &mut [f32]) {
    check(kernel, a, m, b);
    assert_eq!(
        out.len(),
        m * b.n,
        "output: {} values for {m} x {}",
        out.len(),
        b.n
    );
    let rows = round_rows(a, m, b.k);
    run(kernel, &rows, m, b, OutPtr::new(out.as_mut_ptr()));
}

/// `x w` (`Layout::Plain`, `w` is `rows x cols` = `[k][n]`) or `x w^T` (`Layout::Transposed`,
/// `[n][k]`) into a new `m x n` buffer, with `w` rounded and packed in this call, on the fastest
/// kernel here: what a product of a weight met once does. The rounded rows and the packed weight
/// live in this thread's scratch buffers, so such products allocate and zero only their
/// outputs. Panics unless [`available`].
pub fn product(
    a: &[f32],
    m: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> Vec<f32> {
    let (rounded, words) = SCRATCH.with(|c| c.take());
    let b = PackedB::pack_into(words, w, rows, cols, layout);
    let (out, rounded) = product_into_new(a, m, &b, rounded);
    SCRATCH.with(|c| c.set((rounded, b.into_words())));
    out
}

/// `a b` into a new `m x n` buffer for a weight packed before (a frozen weight's product in a
/// training step: [`super::cache`]), the rounded rows in this thread's scratch buffer. Panics
/// unless [`available`].
pub fn product_packed(a: &[f32], m: usize, b: &PackedB) -> Vec<f32> {
    let (rounded, words) = SCRATCH.with(|c| c.take());
    let (out, rounded) = product_into_new(a, m, b, rounded);
    SCRATCH.with(|c| c.set((rounded, words)));
    out
}

/// The product of [`product`] and [`product_packed`], with `rounded` the buffer for the rounded
/// rows (handed back).
fn product_into_new(
    a: &[f32],
    m: usize,
    b: &PackedB,
    mut rounded: Vec<u32>,
) -> (Vec<f32>, Vec<u32>) {
    let kernel = Kernel::detect().expect("bf16 product called on a CPU without AVX-512-BF16");
    check(kernel, a, m, b);
    round_rows_into(&mut rounded, a, m, b.k);
    let len = m * b.n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    run(kernel, &rounded, m, b, OutPtr::new(out.as_mut_ptr()));
    // SAFETY: `run` wrote every one of the `m x n` cells (each task writes all the cells of its
    // block of rows and run of panels, and the tasks cover the output), and `len` is within the
    // capacity.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len);
    }
    (out, rounded)
}

/// The checks every product makes before it runs.
fn check(kernel: Kernel, a: &[f32], m: usize, b: &PackedB) {
    assert_eq!(
        a.len(),
        m * b.k,
        "left operand: {} values for {m} x {}",
        a.len(),
        b.k
    );
    // As `Kernel::all_usable().contains(&kernel)`, without building a list per product.
    let usable = match (kernel, Kernel::detect()) {
        (_, None) => false,
        (Kernel::Avx512Bf16, Some(_)) => true,
        (Kernel::AmxTiles, Some(best)) => best == Kernel::AmxTiles,
    };
    assert!(
        usable,
        "bf16 matmul on {kernel}, which this process may not use"
    );
}

/// The product of rounded rows (`m` of them, padded as [`round_rows_into`] leaves them) and a
/// packed weight into the `m x n` cells at `dst`, every cell written once.
fn run(kernel: Kernel, rows: &[u32], m: usize, b: &PackedB, dst: OutPtr) {
    let n = b.n;
    if m == 0 || n == 0 {
        return;
    }
    let pairs = b.pairs;
    let panels = b.panels();
    let row_blocks = m.div_ceil(ROW_BLOCK);
    // Enough tasks for every thread, each a block of rows times a run of panels.
    let threads = rayon::current_num_threads().max(1);
    let groups = (4 * threads).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        let r0 = rb * ROW_BLOCK;
        let r1 = (r0 + ROW_BLOCK).min(m);
        let block = r0..r1;
        let run = g * per_group..((g + 1) * per_group).min(panels);
        match kernel {
            Kernel::AmxTiles => amx_task(rows, b, block, run, dst, n),
            Kernel::Avx512Bf16 => {
                for q in run {
                    let cols = (n - q * NR).min(NR);
                    let panel = b.panel(q);
                    let mut r = r0;
                    while r < r1 {
                        let tile_rows = (r1 - r).min(MR);
                        // SAFETY: the kernel is usable (checked by the caller); the tile reads
                        // rows `r..r+tile_rows` of `rows` (each `pairs` words) and one panel of
                        // `pairs * NR` words, and writes `tile_rows x cols` cells starting at
                        // (r, q * NR) of the `m x n` output, which no other task writes.
                        #[allow(unsafe_code)]
                        unsafe {
                            #[cfg(target_arch = "x86_64")]
                            x86::tile(
                                rows.as_ptr().add(r * pairs),
                                pairs,
                                tile_rows,
                                panel.as_ptr(),
                                dst.at(r * n + q * NR),
                                n,
                                cols,
                            );
                        }
                        r += tile_rows;
                    }
                }
            }
        }
    });
}

/// One task on AMX tiles: rows `block` of the output (a multiple of the AMX block's rows from
/// its start) times the panels `run`.
fn amx_task(
    rows: &[u32],
    b: &PackedB,
    block: std::ops::Range<usize>,
    run: std::ops::Range<usize>,
    dst: OutPtr,
    n: usize,
) {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let pairs = b.pairs;
        // SAFETY: `matmul_on` checked that AMX is usable in this process.
        #[allow(unsafe_code)]
        let _tiles = unsafe { amx::Tiles::configure() };
        for q in run {
            let cols = (n - q * NR).min(NR);
            let panel = b.panel(q);
            for r in block.clone().step_by(amx::BLOCK_ROWS) {
                let valid = (block.end - r).min(amx::BLOCK_ROWS);
                debug_assert!(rows.len() >= (r + amx::BLOCK_ROWS) * pairs);
                // SAFETY: this thread holds the tiles; `rows` is padded with zero rows to a
                // multiple of the block's 32 rows and `pairs` to a multiple of 16 (`round_rows`,
                // `padded_pairs`), so the block's loads stay inside it and inside the panel; it
                // writes `valid x cols` cells at (r, q * NR) of the `m x n` output, which no other
                // task writes.
                #[allow(unsafe_code)]
                unsafe {
                    amx::block(
                        rows.as_ptr().add(r * pairs),
                        pairs,
                        panel.as_ptr(),
                        dst.at(r * n + q * NR),
                        n,
                        valid,
                        cols,
                    );
                }
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = (rows, b, block, run, dst, n);
        unreachable!("AMX tiles are never usable off x86-64 Linux");
    }
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

    /// Round `len` values at `src` to bf16 into `dst` (as pairs: value `2p` in the low half of
    /// word `p`), 32 at a time; returns how many values it did (a multiple of 32; the caller
    /// does the rest).
    ///
    /// # Safety
    /// AVX-512F and AVX-512-BF16 present; `src` readable for `len` values, `dst` writable for
    /// `len / 2` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(src: *const f32, len: usize, dst: *mut u32) -> usize {
        let mut i = 0;
        while i + 32 <= len {
            let lo = _mm512_loadu_ps(src.add(i));
            let hi = _mm512_loadu_ps(src.add(i + 16));
            // Lanes 0..16 from `lo`, 16..32 from `hi`: memory order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.add(i / 2).cast(), v);
            i += 32;
        }
        i
    }

    /// Round `r0[j]` and `r1[j]` (0 where `r1` is absent or `j` past the slices) and store word
    /// `j` of `out` as `(r0[j], r1[j])`, for the NR words of one pair of a panel.
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and AVX-512-BF16 present; `r0` and `r1` at most NR values; `out`
    /// exactly NR words.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_pair(r0: &[f32], r1: Option<&[f32]>, out: &mut [u32]) {
        debug_assert!(r0.len() <= NR && out.len() == NR);
        // Word i of the result takes u16 lanes i and 16 + i of the converted pair.
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for h in 0..2 {
            let from = h * 16;
            let n0 = r0.len().saturating_sub(from).min(16);
            let m0: __mmask16 = ((1u32 << n0) - 1) as u16;
            let a = _mm512_maskz_loadu_ps(m0, r0.as_ptr().add(from.min(r0.len())));
            let b = match r1 {
                Some(r1) => {
                    let n1 = r1.len().saturating_sub(from).min(16);
                    let m1: __mmask16 = ((1u32 << n1) - 1) as u16;
                    _mm512_maskz_loadu_ps(m1, r1.as_ptr().add(from.min(r1.len())))
                }
                None => _mm512_setzero_ps(),
            };
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let v = _mm512_permutexvar_epi16(idx, v);
            _mm512_storeu_si512(out.as_mut_ptr().add(from).cast(), v);
        }
    }

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
        debug_assert!((1..=MR).contains(&rows) && (1..=NR).contains(&cols));
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
            let m0: __mmask16 = if cols >= 16 {
                0xFFFF
            } else {
                (1u16 << cols) - 1
            };
            let m1: __mmask16 = if cols > 16 {
                ((1u32 << (cols - 16)) - 1) as u16
            } else {
                0
            };
            for (i, v) in acc.iter().enumerate().take(rows) {
                let dst = c.add(i * ldc);
                _mm512_mask_storeu_ps(dst, m0, v[0]);
                _mm512_mask_storeu_ps(dst.add(16), m1, v[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests;
