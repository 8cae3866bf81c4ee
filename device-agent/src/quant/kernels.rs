//! The int8 dot products of the Q8_0 matmul: one weight row (Q8_0 blocks) against every row of
//! the activations (also quantized to Q8_0 blocks), `y[i] = sum_b dw[b] * dx[i, b] * sum_k
//! w[b, k] * x[i, b, k]`, the inner sum exact in int32. Paths: AVX-512 VNNI (`vpdpbusd`),
//! AVX2 (`maddubs` + `madd`) and a portable one (also what aarch64 compiles to). The x86
//! instructions multiply unsigned by signed bytes: AVX2 uses the sign trick, `|x| * (w *
//! sign(x))`, exact because every quantized value lies in `-127..=127` (the quantizer clamps
//! there; `-128` would not survive the sign flip); VNNI the offset trick (see `row_vnni`).

use crate::cpu::DotPath;

/// Values per Q8_0 block (along the input dimension).
pub const QK: usize = 32;

/// One weight row against the activations: `qw`/`dw` are the row's `nb` blocks (values and f16
/// scale bits), `qx`/`dx` the activations' `y.len()` rows of `nb` blocks each, `tab` the f16 ->
/// f32 table. Writes `y[i]` for each activation row `i`.
pub struct RowArgs<'a> {
    pub qw: &'a [i8],
    pub dw: &'a [u16],
    pub qx: &'a [i8],
    pub dx: &'a [f32],
    /// `dx` with each scale repeated 8 times (one per int32 lane of a block's partial sums).
    pub dx8: &'a [f32],
    pub tab: &'a [f32; 65536],
}

/// Run the row kernel of `path` (which the caller has checked the CPU supports: see
/// [`crate::cpu::DotPath::detect`]); the portable one for paths this build lacks.
#[allow(unsafe_code)]
pub fn row_dots(path: DotPath, a: &RowArgs, y: &mut [f32]) {
    let nb = a.dw.len();
    assert!(
        a.qw.len() == nb * QK
            && a.qx.len() == y.len() * nb * QK
            && a.dx.len() == y.len() * nb
            && a.dx8.len() == 8 * a.dx.len()
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni if crate::cpu::hardware().1 >= DotPath::Avx512Vnni => {
            // SAFETY: the CPU reports AVX-512F/BW/VL/VNNI (checked just above); the slices'
            // lengths were checked against `nb` and `y.len()` at the top.
            unsafe { x86::row_vnni(a, y) }
        }
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512Vnni | DotPath::Avx2 if crate::cpu::hardware().1 >= DotPath::Avx2 => {
            // SAFETY: the CPU reports AVX2 and FMA; lengths checked as above.
            unsafe { x86::row_avx2(a, y) }
        }
        _ => row_portable(a, y),
    }
}

/// The portable row kernel (the reference the others are tested against).
pub fn row_portable(a: &RowArgs, y: &mut [f32]) {
    let nb = a.dw.len();
    for (i, yi) in y.iter_mut().enumerate() {
        let qx = &a.qx[i * nb * QK..(i + 1) * nb * QK];
        let dx = &a.dx[i * nb..(i + 1) * nb];
        let mut acc = 0.0f32;
        for b in 0..nb {
            let w = &a.qw[b * QK..(b + 1) * QK];
            let x = &qx[b * QK..(b + 1) * QK];
            let s: i32 = w.iter().zip(x).map(|(&p, &q)| p as i32 * q as i32).sum();
            acc += a.tab[a.dw[b] as usize] * dx[b] * s as f32;
        }
        *yi = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{RowArgs, QK};
    use std::arch::x86_64::*;

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

    /// The shared loop, expanded inside each target-feature function; `$dot8` turns one
    /// block's `(|x|, w * sign(x))` into 8 int32 partial sums.
    macro_rules! rows {
        ($a:expr, $y:expr, $dot8:ident) => {{
            let (a, y): (&RowArgs, &mut [f32]) = ($a, $y);
            let nb = a.dw.len();
            // The weight row's scales, converted once for every activation row.
            let mut dws = [0f32; 64];
            let mut dw_big = Vec::new();
            let dw: &mut [f32] = if nb <= dws.len() {
                &mut dws[..nb]
            } else {
                dw_big.resize(nb, 0.0);
                &mut dw_big
            };
            for (d, &h) in dw.iter_mut().zip(a.dw) {
                *d = a.tab[h as usize];
            }
            let wp = a.qw.as_ptr();
            for (i, yi) in y.iter_mut().enumerate() {
                let xp = a.qx.as_ptr().add(i * nb * QK);
                let dx = a.dx.as_ptr().add(i * nb);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut b = 0;
                while b + 1 < nb {
                    let w0 = _mm256_loadu_si256(wp.add(b * QK) as *const __m256i);
                    let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
                    let w1 = _mm256_loadu_si256(wp.add((b + 1) * QK) as *const __m256i);
                    let x1 = _mm256_loadu_si256(xp.add((b + 1) * QK) as *const __m256i);
                    let p0 = $dot8(_mm256_sign_epi8(x0, x0), _mm256_sign_epi8(w0, x0));
                    let p1 = $dot8(_mm256_sign_epi8(x1, x1), _mm256_sign_epi8(w1, x1));
                    let d0 = _mm256_set1_ps(*dw.get_unchecked(b) * *dx.add(b));
                    let d1 = _mm256_set1_ps(*dw.get_unchecked(b + 1) * *dx.add(b + 1));
                    acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                    acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                    b += 2;
                }
                if b < nb {
                    let w0 = _mm256_loadu_si256(wp.add(b * QK) as *const __m256i);
                    let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
                    let p0 = $dot8(_mm256_sign_epi8(x0, x0), _mm256_sign_epi8(w0, x0));
                    let d0 = _mm256_set1_ps(*dw.get_unchecked(b) * *dx.add(b));
                    acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                }
                *yi = hsum(_mm256_add_ps(acc0, acc1));
            }
        }};
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot8_avx2(ax: __m256i, sw: __m256i) -> __m256i {
        // u8 x i8 pairs summed to i16 (at most 2 * 127 * 127, no saturation), then to i32.
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1))
    }

    /// SAFETY (caller): the CPU has AVX2 and FMA; slice lengths as [`super::row_dots`] checks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_avx2(a: &RowArgs, y: &mut [f32]) {
        rows!(a, y, dot8_avx2)
    }

    /// The VNNI row kernel: two blocks (64 bytes) per 512-bit `vpdpbusd`, four activation rows
    /// per pass over the weight row. Unsigned-by-signed bytes by the offset trick: `x + 128`
    /// (a sign-bit flip) times `w`, the accumulator starting at `-128 * sum(w)` per lane, so
    /// each lane holds exactly `sum(x * w)`. The activations' scales come expanded to 8 lanes
    /// per block (`RowArgs::dx8`), so a pair of blocks' scales is one load.
    ///
    /// SAFETY (caller): the CPU has AVX-512F/BW/VL/VNNI; slice lengths as above.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn row_vnni(a: &RowArgs, y: &mut [f32]) {
        let n = y.len();
        let mut i = 0;
        while i + 4 <= n {
            tile_vnni::<4>(a, i, &mut y[i..i + 4]);
            i += 4;
        }
        while i < n {
            tile_vnni::<1>(a, i, &mut y[i..i + 1]);
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_vnni<const R: usize>(a: &RowArgs, i0: usize, y: &mut [f32]) {
        let nb = a.dw.len();
        let wp = a.qw.as_ptr();
        let flip = _mm512_set1_epi8(-128);
        let flip256 = _mm256_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut b = 0;
        while b + 1 < nb {
            let w = _mm512_loadu_si512(wp.add(b * QK) as *const _);
            // -128 * (sum of each lane's four weights).
            let corr = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, w),
            );
            let dw = _mm512_insertf32x8(
                _mm512_set1_ps(a.tab[*a.dw.get_unchecked(b) as usize]),
                _mm256_set1_ps(a.tab[*a.dw.get_unchecked(b + 1) as usize]),
                1,
            );
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let i = i0 + r;
                let x = _mm512_loadu_si512(a.qx.as_ptr().add((i * nb + b) * QK) as *const _);
                let p = _mm512_dpbusd_epi32(corr, _mm512_xor_si512(x, flip), w);
                let dx = _mm512_loadu_ps(a.dx8.as_ptr().add((i * nb + b) * 8));
                *acc_r = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(p), *acc_r);
            }
            b += 2;
        }
        let mut tail = [0f32; R];
        if b < nb {
            let w = _mm256_loadu_si256(wp.add(b * QK) as *const __m256i);
            let corr = _mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip256, w),
            );
            let dw = a.tab[*a.dw.get_unchecked(b) as usize];
            for (r, t) in tail.iter_mut().enumerate() {
                let i = i0 + r;
                let x = _mm256_loadu_si256(a.qx.as_ptr().add((i * nb + b) * QK) as *const __m256i);
                let p = _mm256_dpbusd_epi32(corr, _mm256_xor_si256(x, flip256), w);
                *t = hsum(_mm256_cvtepi32_ps(p)) * dw * *a.dx.get_unchecked(i * nb + b);
            }
        }
        for ((yr, acc_r), t) in y.iter_mut().zip(acc).zip(tail) {
            *yr = _mm512_reduce_add_ps(acc_r) + t;
        }
    }
}
