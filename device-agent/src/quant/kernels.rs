//! The int8 dot products of the Q8_0 matmul: weight rows (Q8_0 blocks) against every row of
//! the activations (also quantized to Q8_0 blocks), `y[i] = sum_b dw[b] * dx[i, b] * sum_k
//! w[b, k] * x[i, b, k]`, the inner sum exact in int32. Paths: AVX-512 VNNI (`vpdpbusd`),
//! AVX2 (`maddubs` + `madd`), aarch64's `sdot` (signed by signed, no trick needed; it sums
//! each block in int32 and then follows the portable kernel's arithmetic, so its results are
//! the portable kernel's bit for bit) and a portable one (what aarch64 cores without the
//! dot-product extension run, vectorised by the compiler with baseline NEON). The x86
//! instructions multiply unsigned by signed bytes; both x86 paths use the sign trick, `|x| * (w *
//! sign(x))`, exact because every quantized value lies in `-127..=127` (the quantizer clamps
//! there; `-128` would not survive the sign flip).

use super::q4::NIB;
use crate::cpu::DotPath;

/// Values per Q8_0 block (along the input dimension).
pub const QK: usize = 32;

/// The VNNI kernel's tile: weight rows and activation rows multiplied together, each loaded
/// block used `TILE` times from registers. Fewer activation rows than this (a decoded token)
/// take the row-by-row kernel, which is bound by reading the weights anyway.
pub const TILE: usize = 4;

/// Consecutive weight rows against the activations: `qw`/`dw` hold the rows' blocks (`nb` per
/// row: values and f16 scale bits), `qx`/`dx` the activations' `n` rows of `nb` blocks each,
/// `tab` the f16 -> f32 table. Writes `y[j * n + i]` for weight row `j` and activation row `i`.
pub struct RowArgs<'a> {
    pub nb: usize,
    pub qw: &'a [i8],
    pub dw: &'a [u16],
    pub qx: &'a [i8],
    pub dx: &'a [f32],
    pub tab: &'a [f32; 65536],
}

/// Run the row kernel of `path` over every weight row in `a` (the CPU's support is checked
/// once per call, not per row: a decoded token's rows are 18-48 blocks long); the portable one
/// for paths this CPU or build lacks.
#[allow(unsafe_code)]
pub fn row_dots(path: DotPath, a: &RowArgs, y: &mut [f32]) {
    let nb = a.nb;
    let rows = a.dw.len().checked_div(nb).unwrap_or(0);
    let n = a.dx.len().checked_div(nb).unwrap_or(0);
    assert!(
        a.dw.len() == rows * nb
            && a.qw.len() == rows * nb * QK
            && a.qx.len() == n * nb * QK
            && a.dx.len() == n * nb
            && y.len() == rows * n,
        "Q8_0 row kernel: slice lengths disagree"
    );
    if nb == 0 {
        y.fill(0.0);
        return;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni if crate::cpu::hardware().1 >= DotPath::Avx512Vnni => {
            // SAFETY: the CPU reports AVX-512F/BW/VL/VNNI and F16C (checked just above); the
            // slices' lengths were checked against `nb`, the rows and `y` at the top.
            if n >= TILE {
                unsafe { x86::rows_vnni_tiled(a, y, n) }
            } else {
                unsafe { x86::rows_vnni(a, y, n) }
            }
        }
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni | DotPath::Avx2 if crate::cpu::hardware().1 >= DotPath::Avx2 => {
            // SAFETY: the CPU reports AVX2, FMA and F16C; lengths checked as above.
            unsafe { x86::rows_avx2(a, y, n) }
        }
        #[cfg(target_arch = "aarch64")]
        DotPath::NeonDot if crate::cpu::hardware().1 == DotPath::NeonDot => {
            // SAFETY: the CPU reports the dot-product extension (checked just above); the
            // slices' lengths were checked against `nb`, the rows and `y` at the top.
            unsafe { arm::rows_sdot(a, y, n) }
        }
        _ => row_portable(a, y),
    }
}

/// Consecutive weight rows of a 4-bit matrix for the fused kernels: `nib` holds the rows'
/// blocks as GGUF packs them ([`super::q4`]), 16 bytes each; `dw`, `qx`, `dx` as in
/// [`RowArgs`]; `off` the activations' per-block lane offsets ([`offsets_for`]). For Q4_1,
/// `mids` holds the rows' block midpoints (`nb` per row) and `sums` the activation row's block
/// sums (`nb`), and each row's [`midpoint_dot`] is added to its product; both empty otherwise
/// (Q4_0, or a caller that adds the midpoints itself).
pub struct NibArgs<'a> {
    pub nb: usize,
    pub nib: &'a [u8],
    pub dw: &'a [u16],
    pub qx: &'a [i8],
    pub dx: &'a [f32],
    pub off: &'a [i32],
    pub tab: &'a [f32; 65536],
    pub mids: &'a [f32],
    pub sums: &'a [f32],
}

/// The Q4_1 midpoint term of one weight row: `sum_b mids[b] * sums[b]` as two chains of fused
/// multiply-adds (even blocks and an odd last one in the first, odd blocks in the second),
/// then their sum. The fused 4-bit kernels form exactly these operations inside their row
/// loop, so a row's product has the same bits whichever path adds its midpoints.
#[inline]
pub fn midpoint_dot(mids: &[f32], sums: &[f32]) -> f32 {
    debug_assert_eq!(mids.len(), sums.len());
    let (mut even, mut odd) = (0f32, 0f32);
    let (pm, ps) = (mids.chunks_exact(2), sums.chunks_exact(2));
    let (rm, rs) = (pm.remainder(), ps.remainder());
    for (m, s) in pm.zip(ps) {
        even = m[0].mul_add(s[0], even);
        odd = m[1].mul_add(s[1], odd);
    }
    if let (Some(&m), Some(&s)) = (rm.first(), rs.first()) {
        even = m.mul_add(s, even);
    }
    even + odd
}

/// Whether `path` multiplies `n` activation rows straight from a 4-bit matrix's nibbles on
/// this CPU ([`nib_row_dots`]). Where it does not, the caller unpacks rows to int8 and runs
/// [`row_dots`]: the x86 paths for more than one activation row (the tiled kernel amortises
/// unpacking over its rows), and the portable path.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn fuses_nibbles(path: DotPath, n: usize) -> bool {
    match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni | DotPath::Avx2 => n == 1 && crate::cpu::hardware().1 >= DotPath::Avx2,
        #[cfg(target_arch = "aarch64")]
        DotPath::NeonDot => crate::cpu::hardware().1 == DotPath::NeonDot,
        _ => false,
    }
}

/// The activations' lane offsets where `path`'s fused kernel reads them (the x86 ones, which
/// multiply unsigned nibbles), computed once per activation set; empty for `sdot`, which
/// subtracts 8 from the nibbles instead.
pub fn offsets_for(path: DotPath, qx: &super::QRows) -> &[i32] {
    match path {
        DotPath::Avx512Vnni | DotPath::Avx2 => qx.nibble_offsets(),
        DotPath::NeonDot | DotPath::Portable => &[],
    }
}

/// The fused 4-bit row kernel of `path` (only where [`fuses_nibbles`] says so): each block's
/// values are `q - 8` for its nibbles `q`, and every int32 lane and f32 operation is the one
/// [`row_dots`] performs on the unpacked rows, so the two agree bit for bit.
#[allow(unsafe_code)]
pub fn nib_row_dots(path: DotPath, a: &NibArgs, y: &mut [f32]) {
    let nb = a.nb;
    let rows = a.dw.len().checked_div(nb).unwrap_or(0);
    let n = a.dx.len().checked_div(nb).unwrap_or(0);
    assert!(
        fuses_nibbles(path, n)
            && a.dw.len() == rows * nb
            && a.nib.len() == rows * nb * NIB
            && a.qx.len() == n * nb * QK
            && a.dx.len() == n * nb
            && (a.off.len() == n * nb * 8 || !matches!(path, DotPath::Avx512Vnni | DotPath::Avx2))
            && y.len() == rows * n
            && (a.mids.is_empty() || (a.mids.len() == rows * nb && a.sums.len() == nb && n == 1)),
        "4-bit row kernel: no fused kernel here, or slice lengths disagree"
    );
    if nb == 0 {
        y.fill(0.0);
        return;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni if crate::cpu::hardware().1 >= DotPath::Avx512Vnni => {
            // SAFETY: the CPU reports AVX-512F/BW/VL/VNNI and F16C (checked just above); the
            // slices' lengths were checked against `nb`, the rows and `y` at the top.
            unsafe { x86::nib_rows_vnni(a, y) }
        }
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni | DotPath::Avx2 => {
            // SAFETY: `fuses_nibbles` checked AVX2 (and with it FMA and F16C); lengths as above.
            unsafe { x86::nib_rows_avx2(a, y) }
        }
        #[cfg(target_arch = "aarch64")]
        DotPath::NeonDot => {
            // SAFETY: `fuses_nibbles` checked the dot-product extension; lengths as above.
            unsafe { arm::nib_rows_sdot(a, y, n) };
            if !a.mids.is_empty() {
                for (yj, mj) in y.iter_mut().zip(a.mids.chunks_exact(nb)) {
                    *yj += midpoint_dot(mj, a.sums);
                }
            }
        }
        _ => unreachable!("fuses_nibbles was checked"),
    }
}

/// The portable row kernel (the reference the others are tested against).
pub fn row_portable(a: &RowArgs, y: &mut [f32]) {
    let nb = a.nb;
    let n = a.dx.len().checked_div(nb).unwrap_or(0);
    if n == 0 {
        return;
    }
    for (j, yj) in y.chunks_mut(n).enumerate() {
        let qw = &a.qw[j * nb * QK..(j + 1) * nb * QK];
        let dw = &a.dw[j * nb..(j + 1) * nb];
        for (i, yi) in yj.iter_mut().enumerate() {
            let qx = &a.qx[i * nb * QK..(i + 1) * nb * QK];
            let dx = &a.dx[i * nb..(i + 1) * nb];
            let mut acc = 0.0f32;
            for b in 0..nb {
                let w = &qw[b * QK..(b + 1) * QK];
                let x = &qx[b * QK..(b + 1) * QK];
                let s: i32 = w.iter().zip(x).map(|(&p, &q)| p as i32 * q as i32).sum();
                acc += a.tab[dw[b] as usize] * dx[b] * s as f32;
            }
            *yi = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{NibArgs, RowArgs, NIB, QK, TILE};
    use std::arch::x86_64::*;

    /// Bytes ahead of the row being read that a one-row kernel prefetches into L2. One core
    /// reading a decoded token's weights with only L1 prefetches (two rows, about 1 KiB,
    /// ahead) waited on its line-fill buffers: ten to sixteen lines in flight at once, about
    /// 10 GB/s. L2 prefetches far ahead keep more lines in flight; 4 KiB was the best of 2-12
    /// KiB on the Intel AMX host (Q8_0 decoding 1.17-1.20x, BENCHMARKS.md "Prefetching a
    /// decoded token's weights into L2").
    const PREFETCH_L2: usize = 4096;
    /// Bytes ahead that the same kernel prefetches into L1, from L2 by then.
    const PREFETCH_L1: usize = 512;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One weight row's scales converted once for every activation row: `dw` has `nb` places.
    /// With F16C's `vcvtph2ps` (exact, as the table: every f16 is an f32), eight at a time and
    /// the rest one by one; a decoded token's rows are 18-48 blocks, where looking each scale
    /// up in the 256 KiB table was 6% of a Q8_0 token (and the two left over from 576-wide
    /// rows, looked up there, still 4%: the table's lines miss the cache).
    ///
    /// SAFETY (caller): the CPU has F16C (and AVX for the 256-bit registers).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn row_scales(a: &RowArgs, j: usize, dw: &mut [f32]) {
        let nb = a.nb;
        let src = &a.dw[j * nb..(j + 1) * nb];
        let whole = nb / 8 * 8;
        for (d, h) in dw[..whole].chunks_exact_mut(8).zip(src.chunks_exact(8)) {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i));
            _mm256_storeu_ps(d.as_mut_ptr(), v);
        }
        for (d, &h) in dw[whole..nb].iter_mut().zip(&src[whole..]) {
            *d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))));
        }
    }

    /// Block `b` of the weight row at `wp` against the activation row at `xp`: `$dot8` of
    /// `(|x|, w * sign(x))`, 8 int32 partial sums.
    macro_rules! block_dot {
        ($wp:expr, $xp:expr, $b:expr, $dot8:ident) => {{
            let w = _mm256_loadu_si256($wp.add($b * QK) as *const __m256i);
            let x = _mm256_loadu_si256($xp.add($b * QK) as *const __m256i);
            $dot8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x))
        }};
    }

    /// One weight row (`nb` blocks) against one activation row, two blocks at a time with two
    /// accumulators: `block` gives block `b`'s 8 int32 partial sums, `two` blocks `b` and `b +
    /// 1`'s combined scales (weight times activation, broadcast), `one` block `b`'s for an odd
    /// last block.
    macro_rules! row_dot {
        ($nb:expr, |$b:ident| block $block:expr, two $two:expr, one $one:expr) => {{
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut $b = 0;
            while $b + 1 < $nb {
                let p0 = $block;
                let p1 = {
                    let $b = $b + 1;
                    $block
                };
                let (d0, d1): (__m256, __m256) = $two;
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                $b += 2;
            }
            if $b < $nb {
                let p0 = $block;
                let d0: __m256 = $one;
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }};
    }

    /// The dot product of weight row `j` (its scales converted in `dw`) with activation row
    /// `i`, expanded inside each target-feature function; `$dot8` turns one block's `(|x|, w *
    /// sign(x))` into 8 int32 partial sums.
    macro_rules! pair {
        ($a:expr, $j:expr, $i:expr, $dw:expr, $dot8:ident) => {{
            let (a, j, i, dw): (&RowArgs, usize, usize, &[f32]) = ($a, $j, $i, $dw);
            let nb = a.nb;
            let wp = a.qw.as_ptr().add(j * nb * QK);
            let xp = a.qx.as_ptr().add(i * nb * QK);
            let dx = a.dx.as_ptr().add(i * nb);
            row_dot!(nb, |b| block block_dot!(wp, xp, b, $dot8), two (
                _mm256_set1_ps(*dw.get_unchecked(b) * *dx.add(b)),
                _mm256_set1_ps(*dw.get_unchecked(b + 1) * *dx.add(b + 1)),
            ), one _mm256_set1_ps(*dw.get_unchecked(b) * *dx.add(b)))
        }};
    }

    /// Every weight row against every activation row, one pair at a time.
    macro_rules! rows {
        ($a:expr, $y:expr, $n:expr, $dot8:ident) => {{
            let (a, y, n): (&RowArgs, &mut [f32], usize) = ($a, $y, $n);
            let nb = a.nb;
            let mut dws = [0f32; 64];
            let mut dw_big = Vec::new();
            let dw: &mut [f32] = if nb <= dws.len() {
                &mut dws[..nb]
            } else {
                dw_big.resize(nb, 0.0);
                &mut dw_big
            };
            for (j, yj) in y.chunks_mut(n).enumerate() {
                row_scales(a, j, dw);
                for (i, yi) in yj.iter_mut().enumerate() {
                    *yi = pair!(a, j, i, dw, $dot8);
                }
            }
        }};
    }

    /// One activation row (a decoded token) against every weight row, the weights' scales
    /// converted inside the loop, two blocks at a time, where [`rows!`] converts a row's scales
    /// into a buffer first: here that pass was 8% of a token, waiting on each row's first
    /// scale from memory before the row's products could start. Each row's `row_bytes` of
    /// values are prefetched twice: [`PREFETCH_L2`] bytes ahead into L2 and [`PREFETCH_L1`]
    /// ahead into L1 (the scales two rows ahead); `block` gives weight row `j`'s block `b`
    /// against the activations' as 8 int32 partial sums; `after j, yj => ...` (optional) runs
    /// once a row's output `yj` is written (Q4_1's midpoint term).
    macro_rules! rows_one {
        ($a:expr, $y:expr, $w:expr, $row_bytes:expr, |$j:ident, $b:ident| $block:expr) => {
            rows_one!($a, $y, $w, $row_bytes, |$j, $b| $block, after _j, _yj => ())
        };
        ($a:expr, $y:expr, $w:expr, $row_bytes:expr, |$j:ident, $b:ident| $block:expr, after $pj:ident, $py:ident => $post:expr) => {{
            let a = $a;
            let y: &mut [f32] = $y;
            let nb = a.nb;
            let (w, row_bytes): (*const i8, usize) = ($w, $row_bytes);
            let dx = a.dx.as_ptr();
            let rows = y.len();
            let end = w.wrapping_add(rows * row_bytes);
            for ($j, yj) in y.iter_mut().enumerate() {
                // Hints only: an address past the matrix is never prefetched or dereferenced.
                let here = w.add($j * row_bytes);
                for line in (0..row_bytes).step_by(64) {
                    let far = here.wrapping_add(PREFETCH_L2 + line);
                    if far < end {
                        _mm_prefetch::<_MM_HINT_T1>(far);
                    }
                    let near = here.wrapping_add(PREFETCH_L1 + line);
                    if near < end {
                        _mm_prefetch::<_MM_HINT_T0>(near);
                    }
                }
                if $j + 2 < rows {
                    _mm_prefetch::<_MM_HINT_T0>(a.dw.as_ptr().add(($j + 2) * nb) as *const i8);
                }
                let dwp = a.dw.as_ptr().add($j * nb);
                // Both blocks' weight scales (two f16) times the activations' scales.
                *yj = row_dot!(nb, |$b| block $block, two {
                    let hw = (dwp.add($b) as *const i32).read_unaligned();
                    let s = _mm_mul_ps(
                        _mm_cvtph_ps(_mm_cvtsi32_si128(hw)),
                        _mm_castpd_ps(_mm_load_sd(dx.add($b) as *const f64)),
                    );
                    (_mm256_broadcastss_ps(s), _mm256_broadcastss_ps(_mm_movehdup_ps(s)))
                }, one {
                    let hw = i32::from(*dwp.add($b));
                    let s = _mm_mul_ss(_mm_cvtph_ps(_mm_cvtsi32_si128(hw)), _mm_load_ss(dx.add($b)));
                    _mm256_broadcastss_ps(s)
                });
                let ($pj, $py) = ($j, yj);
                $post;
            }
        }};
    }

    /// [`rows_one!`] over Q8_0 rows.
    macro_rules! rows_one_q8 {
        ($a:expr, $y:expr, $dot8:ident) => {{
            let a: &RowArgs = $a;
            let (qw, xp) = (a.qw.as_ptr(), a.qx.as_ptr());
            rows_one!(a, $y, qw, a.nb * QK, |j, b| {
                let wp = qw.add(j * a.nb * QK);
                block_dot!(wp, xp, b, $dot8)
            })
        }};
    }

    /// [`rows_one!`] over 4-bit rows read straight from their nibbles: a block's 16 bytes
    /// become 32 unsigned values (`0..=15`, low nibbles then high ones, GGUF's order), which
    /// `$dotq` multiplies by the activations' block, starting from the activations' offsets
    /// (`-8 *` each lane's sum), so each lane ends with exactly what the unpacked kernel's has:
    /// the sum of `(q - 8) * x` over its four values.
    macro_rules! rows_one_nib {
        ($a:expr, $y:expr, $dotq:ident) => {{
            // Two loops, so that Q4_0's has no midpoint term in it at all.
            if $a.mids.is_empty() {
                rows_one_nib!($a, $y, $dotq, false)
            } else {
                rows_one_nib!($a, $y, $dotq, true)
            }
        }};
        ($a:expr, $y:expr, $dotq:ident, $with_mids:literal) => {{
            let a: &NibArgs = $a;
            let (np, xp, op) = (a.nib.as_ptr(), a.qx.as_ptr(), a.off.as_ptr());
            let low4 = _mm256_set1_epi8(0x0f);
            rows_one!(a, $y, np as *const i8, a.nb * NIB, |j, b| {
                let raw = _mm_loadu_si128(np.add((j * a.nb + b) * NIB) as *const __m128i);
                let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
                let x = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
                let o = _mm256_loadu_si256(op.add(b * 8) as *const __m256i);
                $dotq(o, q, x)
            }, after j, yj => if $with_mids {
                *yj += midpoint_dot_x86(a.mids.as_ptr().add(j * a.nb), a.sums.as_ptr(), a.nb);
            })
        }};
    }

    /// [`super::midpoint_dot`] with both chains in two lanes of one register: the same fused
    /// multiply-adds in the same order, so the same bits.
    ///
    /// SAFETY (caller): the CPU has AVX2 and FMA; `mids` and `sums` hold `nb` values each.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn midpoint_dot_x86(mids: *const f32, sums: *const f32, nb: usize) -> f32 {
        let mut acc = _mm_setzero_ps();
        let mut b = 0;
        while b + 1 < nb {
            let m = _mm_castpd_ps(_mm_load_sd(mids.add(b) as *const f64));
            let s = _mm_castpd_ps(_mm_load_sd(sums.add(b) as *const f64));
            acc = _mm_fmadd_ps(m, s, acc);
            b += 2;
        }
        let odd = _mm_cvtss_f32(_mm_movehdup_ps(acc));
        if b < nb {
            // `vfmadd..ss` takes its upper lanes from the first operand: lane 0 only is read.
            acc = _mm_fmadd_ss(_mm_load_ss(mids.add(b)), _mm_load_ss(sums.add(b)), acc);
        }
        _mm_cvtss_f32(acc) + odd
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot8_avx2(ax: __m256i, sw: __m256i) -> __m256i {
        // u8 x i8 pairs summed to i16 (at most 2 * 127 * 127, no saturation), then to i32.
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1))
    }

    /// SAFETY (caller): the CPU has AVX2, FMA and F16C; slice lengths as [`super::row_dots`] checks,
    /// `n` activation rows, `nb > 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2(a: &RowArgs, y: &mut [f32], n: usize) {
        if n == 1 {
            rows_one_q8!(a, y, dot8_avx2)
        } else {
            rows!(a, y, n, dot8_avx2)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dotq_avx2(off: __m256i, q: __m256i, x: __m256i) -> __m256i {
        // u8 nibbles x i8 pairs summed to i16 (at most 2 * 15 * 127), then to i32.
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
        _mm256_add_epi32(off, p)
    }

    /// SAFETY (caller): the CPU has AVX2, FMA and F16C; slice lengths as
    /// [`super::nib_row_dots`] checks (one activation row), `nb > 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn nib_rows_avx2(a: &NibArgs, y: &mut [f32]) {
        rows_one_nib!(a, y, dotq_avx2)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn dotq_vnni(off: __m256i, q: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(off, q, x)
    }

    /// SAFETY (caller): the CPU has AVX-512F/VL/VNNI and F16C; slice lengths as
    /// [`super::nib_row_dots`] checks (one activation row), `nb > 0`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn nib_rows_vnni(a: &NibArgs, y: &mut [f32]) {
        rows_one_nib!(a, y, dotq_vnni)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn dot8_vnni(ax: __m256i, sw: __m256i) -> __m256i {
        // One instruction for AVX2's two: u8 x i8 quads summed straight into i32 lanes.
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw)
    }

    /// The VNNI row kernel: AVX2's loop and sign trick with `vpdpbusd` on 256-bit registers.
    /// (An earlier 512-bit version, two blocks per instruction with the `x + 128` offset trick,
    /// ran at half AVX2's speed on Zen 4, whose 512-bit operations are two 256-bit halves and
    /// where the offset's correction cost a second `vpdpbusd` per block pair.)
    ///
    /// SAFETY (caller): the CPU has AVX-512F/VL/VNNI and F16C; slice lengths as above.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn rows_vnni(a: &RowArgs, y: &mut [f32], n: usize) {
        if n == 1 {
            rows_one_q8!(a, y, dot8_vnni)
        } else {
            rows!(a, y, n, dot8_vnni)
        }
    }

    /// The VNNI kernel for several activation rows: tiles of [`TILE`] weight rows x `TILE`
    /// activation rows, so each loaded block serves four products from registers. It uses the
    /// offset trick instead of the sign trick, which costs an instruction per product: `x +
    /// 128` is unsigned (`x ^ 0x80` for `x` in `-127..=127`), and `vpdpbusd` starting from
    /// `-128 * sum(w)` per lane (one more `vpdpbusd` per weight block, shared by the tile's four
    /// activation rows) gives `sum(x * w)` exactly in int32. Rows and activation rows past the
    /// last whole tile take the pair kernel.
    ///
    /// SAFETY (caller): the CPU has AVX-512F/VL/VNNI and F16C; slice lengths as above.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)] // the accumulator tile is indexed as its operands are
    pub unsafe fn rows_vnni_tiled(a: &RowArgs, y: &mut [f32], n: usize) {
        const T: usize = TILE;
        let nb = a.nb;
        let rows = y.len() / n;
        let n_t = n / T * T;
        let mut dw = vec![0f32; T * nb];
        let flip = _mm256_set1_epi8(i8::MIN);
        let zero = _mm256_setzero_si256();
        for j0 in (0..rows).step_by(T) {
            let tj = (rows - j0).min(T);
            for t in 0..tj {
                row_scales(a, j0 + t, &mut dw[t * nb..(t + 1) * nb]);
            }
            if tj == T {
                let wp: [*const i8; T] =
                    std::array::from_fn(|t| a.qw.as_ptr().add((j0 + t) * nb * QK));
                for i0 in (0..n_t).step_by(T) {
                    let xp: [*const i8; T] =
                        std::array::from_fn(|t| a.qx.as_ptr().add((i0 + t) * nb * QK));
                    let mut acc = [[_mm256_setzero_ps(); T]; T];
                    for b in 0..nb {
                        let mut w = [zero; T];
                        let mut start = [zero; T];
                        let mut bw = [_mm256_setzero_ps(); T];
                        for t in 0..T {
                            w[t] = _mm256_loadu_si256(wp[t].add(b * QK) as *const __m256i);
                            // -128 * (sum of each lane's four weights): the offset's correction.
                            start[t] =
                                _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, flip, w[t]));
                            bw[t] = _mm256_set1_ps(*dw.get_unchecked(t * nb + b));
                        }
                        for u in 0..T {
                            let x = _mm256_loadu_si256(xp[u].add(b * QK) as *const __m256i);
                            let xu = _mm256_xor_si256(x, flip);
                            let bx = _mm256_set1_ps(*a.dx.get_unchecked((i0 + u) * nb + b));
                            for t in 0..T {
                                let p = _mm256_dpbusd_epi32(start[t], xu, w[t]);
                                let s = _mm256_mul_ps(bw[t], bx);
                                acc[t][u] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[t][u]);
                            }
                        }
                    }
                    for t in 0..T {
                        for u in 0..T {
                            *y.get_unchecked_mut((j0 + t) * n + i0 + u) = hsum(acc[t][u]);
                        }
                    }
                }
            }
            // What the tiles left: every activation row of a partial tile of weight rows, the
            // activation rows past the last whole tile of a full one.
            let from = if tj == T { n_t } else { 0 };
            for t in 0..tj {
                let dwt = &dw[t * nb..(t + 1) * nb];
                for i in from..n {
                    y[(j0 + t) * n + i] = pair!(a, j0 + t, i, dwt, dot8_vnni);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
pub(super) mod arm {
    use super::{NibArgs, RowArgs, NIB, QK};
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// `acc + sdot(w, x)`: each of the four int32 lanes gains the sum of its four byte
    /// products. Written as assembly: the `vdotq_s32` intrinsic is not stable in our Rust.
    ///
    /// SAFETY (caller): the CPU has the dot-product extension.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    pub(in crate::quant) unsafe fn sdot(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// Every weight row against every activation row: per block two `sdot`s and one
    /// across-lanes add give the block's exact int32 sum, which is then scaled and accumulated
    /// in f32 exactly as [`super::row_portable`] does (same operations, same order), so the two
    /// kernels agree bit for bit. Quantized values lie in `-127..=127` and a block's sum in
    /// `±32 * 127²`, far inside int32.
    ///
    /// SAFETY (caller): the CPU has the dot-product extension; slice lengths as
    /// [`super::row_dots`] checks, `n` activation rows, `nb > 0`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn rows_sdot(a: &RowArgs, y: &mut [f32], n: usize) {
        if n == 0 {
            return;
        }
        let nb = a.nb;
        for (j, yj) in y.chunks_mut(n).enumerate() {
            let wp = a.qw.as_ptr().add(j * nb * QK);
            let dw = &a.dw[j * nb..(j + 1) * nb];
            for (i, yi) in yj.iter_mut().enumerate() {
                let xp = a.qx.as_ptr().add(i * nb * QK);
                let dx = &a.dx[i * nb..(i + 1) * nb];
                let mut acc = 0.0f32;
                for b in 0..nb {
                    let (w, x) = (wp.add(b * QK), xp.add(b * QK));
                    let p = sdot(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
                    let p = sdot(p, vld1q_s8(w.add(16)), vld1q_s8(x.add(16)));
                    let s = vaddvq_s32(p);
                    acc += a.tab[dw[b] as usize] * dx[b] * s as f32;
                }
                *yi = acc;
            }
        }
    }

    /// [`rows_sdot`] reading 4-bit rows straight from their nibbles: a block's 16 bytes give
    /// its low-nibble values (`0..16`) and high-nibble values (`16..32`), less 8, as signed
    /// bytes, which `sdot` takes as they are; the rest is `rows_sdot`'s arithmetic, so the
    /// result is the portable kernel's on the unpacked rows, bit for bit.
    ///
    /// SAFETY (caller): the CPU has the dot-product extension; slice lengths as
    /// [`super::nib_row_dots`] checks, `n` activation rows, `nb > 0`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn nib_rows_sdot(a: &NibArgs, y: &mut [f32], n: usize) {
        if n == 0 {
            return;
        }
        let nb = a.nb;
        let (low4, eight) = (vdupq_n_u8(0x0f), vdupq_n_s8(8));
        for (j, yj) in y.chunks_mut(n).enumerate() {
            let np = a.nib.as_ptr().add(j * nb * NIB);
            let dw = &a.dw[j * nb..(j + 1) * nb];
            for (i, yi) in yj.iter_mut().enumerate() {
                let xp = a.qx.as_ptr().add(i * nb * QK);
                let dx = &a.dx[i * nb..(i + 1) * nb];
                let mut acc = 0.0f32;
                for b in 0..nb {
                    let raw = vld1q_u8(np.add(b * NIB));
                    let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low4)), eight);
                    let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)), eight);
                    let x = xp.add(b * QK);
                    let p = sdot(vdupq_n_s32(0), lo, vld1q_s8(x));
                    let p = sdot(p, hi, vld1q_s8(x.add(16)));
                    let s = vaddvq_s32(p);
                    acc += a.tab[dw[b] as usize] * dx[b] * s as f32;
                }
                *yi = acc;
            }
        }
    }
}
