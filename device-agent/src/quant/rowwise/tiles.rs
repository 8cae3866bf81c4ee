//! The 4 x 4 tiles of [`super::add_product`]: the int32 sums of four rows of `a` against four
//! rows of `b`, one kernel per [`DotPath`]. Every sum is exact, so every tile gives the same
//! integers; only the VNNI tile's are offset (it sums `(a + 128) * b`, which the caller corrects
//! with `b`'s row sums).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused, unused_unsafe))]

use super::{MR, NR};
use crate::cpu::DotPath;

/// The tile of `path`.
///
/// SAFETY (caller): this CPU runs `path` ([`DotPath::runs_here`]; [`super::add_product`] falls
/// back to [`DotPath::Portable`] where it does not), and every row slice has the same length, a
/// multiple of [`super::STEP`] (the kernels read each row to the first one's length).
#[allow(unsafe_code)]
pub(super) unsafe fn tile(path: DotPath, ra: [&[i8]; MR], rb: [&[i8]; NR]) -> Tile {
    debug_assert!(path.runs_here());
    debug_assert!(ra.iter().chain(&rb).all(|r| r.len() == ra[0].len()));
    debug_assert_eq!(ra[0].len() % super::STEP, 0);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract: the CPU has AVX-512F/BW/VL/VNNI (and AVX2); every row
        // slice is the same length, a multiple of 64.
        DotPath::Avx512Vnni => unsafe { x86::tile_vnni(ra, rb) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract: the CPU has AVX2; rows as above.
        DotPath::Avx2 => unsafe { x86::tile_avx2(ra, rb) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the caller's contract: the CPU has the dot-product extension; rows as above.
        DotPath::NeonDot => unsafe { arm::tile_sdot(ra, rb) },
        _ => tile_portable(ra, rb),
    }
}

/// The int32 sums of a tile: `MR x NR` rows' dot products, row-major (rows of the tile short of
/// `MR` or `NR` read row 0 again and are dropped by the caller).
pub(super) type Tile = [[i32; NR]; MR];

/// The portable tile: plain integer loops, which the compiler vectorises.
fn tile_portable(a: [&[i8]; MR], b: [&[i8]; NR]) -> Tile {
    let mut t = [[0i32; NR]; MR];
    for (ti, ar) in t.iter_mut().zip(a) {
        for (c, br) in ti.iter_mut().zip(b) {
            *c = ar
                .iter()
                .zip(br)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// The lane sums of four accumulators, in their order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sums4(v: &[__m256i; 4]) -> [i32; 4] {
        let ab = _mm256_hadd_epi32(v[0], v[1]);
        let cd = _mm256_hadd_epi32(v[2], v[3]);
        let abcd = _mm256_hadd_epi32(ab, cd);
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256::<1>(abcd),
        );
        let mut t = [0i32; 4];
        // SAFETY: `t` holds four int32, 16 bytes.
        unsafe { _mm_storeu_si128(t.as_mut_ptr().cast(), s) };
        t
    }

    /// Two rows of `a` against the four of `b`: eight accumulators, the four rows of `b`, the
    /// ones, a row of `a` with its absolute values and a product fit AVX2's sixteen registers
    /// (a whole 4 x 4 tile would spill its accumulators).
    ///
    /// SAFETY (caller): AVX2; every slice the same length, a multiple of 32.
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::needless_range_loop)] // the accumulator tile is indexed as its operands are
    unsafe fn half_avx2(a: [&[i8]; 2], b: [&[i8]; NR]) -> [[i32; NR]; 2] {
        let len = a[0].len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); NR]; 2];
        let mut k = 0;
        while k < len {
            // SAFETY: k + 32 <= len, the length of every row.
            let bv: [__m256i; NR] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_si256(b[j].as_ptr().add(k).cast()) });
            for i in 0..2 {
                // SAFETY: as above.
                let av = unsafe { _mm256_loadu_si256(a[i].as_ptr().add(k).cast()) };
                let aa = _mm256_abs_epi8(av);
                for j in 0..NR {
                    let s = _mm256_sign_epi8(bv[j], av);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aa, s), ones);
                    acc[i][j] = _mm256_add_epi32(acc[i][j], p);
                }
            }
            k += 32;
        }
        [sums4(&acc[0]), sums4(&acc[1])]
    }

    /// The tile as two halves of two rows of `a` (the rows of `b` read twice, from L1).
    ///
    /// SAFETY (caller): AVX2; every slice the same length, a multiple of 32.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_avx2(a: [&[i8]; MR], b: [&[i8]; NR]) -> Tile {
        // SAFETY: the caller's contract, passed on.
        let [r0, r1] = unsafe { half_avx2([a[0], a[1]], b) };
        // SAFETY: as above.
        let [r2, r3] = unsafe { half_avx2([a[2], a[3]], b) };
        [r0, r1, r2, r3]
    }

    /// Sums `(a + 128) * b` on 512-bit registers: the caller subtracts `128 * sum(b)`.
    ///
    /// SAFETY (caller): AVX2, AVX-512F/BW/VL/VNNI; every slice the same length, a multiple of 64.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn tile_vnni(a: [&[i8]; MR], b: [&[i8]; NR]) -> Tile {
        let len = a[0].len();
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); NR]; MR];
        let mut k = 0;
        while k < len {
            // SAFETY: k + 64 <= len, the length of every row.
            let bv: [__m512i; NR] =
                std::array::from_fn(|j| unsafe { _mm512_loadu_si512(b[j].as_ptr().add(k).cast()) });
            for i in 0..MR {
                // SAFETY: as above.
                let av = unsafe { _mm512_loadu_si512(a[i].as_ptr().add(k).cast()) };
                let au = _mm512_xor_si512(av, flip);
                for j in 0..NR {
                    acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], au, bv[j]);
                }
            }
            k += 64;
        }
        std::array::from_fn(|i| {
            let halves: [__m256i; NR] = std::array::from_fn(|j| {
                _mm256_add_epi32(
                    _mm512_castsi512_si256(acc[i][j]),
                    _mm512_extracti64x4_epi64::<1>(acc[i][j]),
                )
            });
            sums4(&halves)
        })
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm {
    use super::{Tile, MR, NR};
    use crate::quant::kernels::arm::sdot;
    use std::arch::aarch64::*;

    /// The whole `MR x NR` tile in registers: sixteen accumulators and the eight rows' 16 bytes
    /// fit aarch64's 32 vector registers. Every int32 sum is exact (at most `k * 127²`, and `k`
    /// is bounded by [`crate::quant::rowwise::MAX_K`]), so the tile equals the portable one.
    ///
    /// SAFETY (caller): the dot-product extension; every slice the same length, a multiple of 16.
    #[target_feature(enable = "neon,dotprod")]
    #[allow(clippy::needless_range_loop)] // the accumulator tile is indexed as its operands are
    pub unsafe fn tile_sdot(a: [&[i8]; MR], b: [&[i8]; NR]) -> Tile {
        let len = a[0].len();
        let mut acc = [[vdupq_n_s32(0); NR]; MR];
        let mut k = 0;
        while k < len {
            // SAFETY: k + 16 <= len, the length of every row.
            let bv: [int8x16_t; NR] =
                std::array::from_fn(|j| unsafe { vld1q_s8(b[j].as_ptr().add(k)) });
            for i in 0..MR {
                // SAFETY: as above.
                let av = unsafe { vld1q_s8(a[i].as_ptr().add(k)) };
                for j in 0..NR {
                    // SAFETY: the caller's contract.
                    acc[i][j] = unsafe { sdot(acc[i][j], av, bv[j]) };
                }
            }
            k += 16;
        }
        std::array::from_fn(|i| std::array::from_fn(|j| vaddvq_s32(acc[i][j])))
    }
}
