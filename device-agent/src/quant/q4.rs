//! GGUF's 4-bit blocks: the block rules (the one definition; the GGUF writer calls them too)
//! and the unpacking that turns a run of rows into the int8 values the dot kernels read.
//!
//! Both formats hold 32 weights per block as 16 bytes of nibbles, value `j` in the low nibble
//! of byte `j` and value `j + 16` in its high nibble (GGUF's order, so a block is copied from or
//! to a file as it is), with f16 parameters:
//! - Q4_0: a scale `d`; value `(q - 8) d`. The rule puts the block's value of largest magnitude
//!   at `q = 0` (`d = v_max / -8`), so that value comes back exactly.
//! - Q4_1: a scale `d` and a minimum `m`; value `q d + m`, `d = (max - min) / 15`.
//!
//! Unpacked for the kernels, both give `q - 8` (in `-8..=7`); Q4_1's block is then `(q - 8) d`
//! plus its midpoint `m + 8 d`, added outside the int8 sums (`(m + 8 d) * sum(x)` per block).

use super::QK;

/// Bytes of nibbles per block.
pub const NIB: usize = QK / 2;

/// Quantize up to 32 values (missing ones count as 0) to one Q4_0 block: `d = v / -8` for the
/// value `v` of largest magnitude (the first if tied), `q = min(15, floor(x / d + 8.5))`.
/// Returns `d` in f32 (stored as f16).
pub fn quantize_block_q4_0(values: &[f32], nib: &mut [u8; NIB]) -> f32 {
    let (mut amax, mut vmax) = (0f32, 0f32);
    for &v in values.iter().take(QK) {
        if amax < v.abs() {
            amax = v.abs();
            vmax = v;
        }
    }
    let d = vmax / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |k: usize| -> u8 {
        let v = values.get(k).copied().unwrap_or(0.0);
        // `as u8` saturates (and takes NaN to 0); `x / d + 8.5` is at least 0.5 for finite
        // input, so truncation is the floor.
        ((v * inv + 8.5) as u8).min(15)
    };
    for (j, b) in nib.iter_mut().enumerate() {
        *b = q(j) | (q(j + NIB) << 4);
    }
    d
}

/// Quantize up to 32 values (missing ones count as 0) to one Q4_1 block: `m` the minimum,
/// `d = (max - min) / 15`, `q = min(15, floor((x - m) / d + 0.5))`. Returns `(d, m)` in f32
/// (both stored as f16).
pub fn quantize_block_q4_1(values: &[f32], nib: &mut [u8; NIB]) -> (f32, f32) {
    let value = |k: usize| values.get(k).copied().unwrap_or(0.0);
    let (mut lo, mut hi) = (f32::MAX, -f32::MAX);
    for k in 0..QK {
        lo = lo.min(value(k));
        hi = hi.max(value(k));
    }
    let d = (hi - lo) / 15.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |k: usize| -> u8 { (((value(k) - lo) * inv + 0.5) as u8).min(15) };
    for (j, b) in nib.iter_mut().enumerate() {
        *b = q(j) | (q(j + NIB) << 4);
    }
    (d, lo)
}

/// Unpack whole blocks of nibbles into int8 values, `out.len() == 2 * nib.len()`: each value
/// less `offset` (8 for Q4_0, 0 for Q4_1). Written as two plain loops over a block so the
/// compiler vectorises it.
#[inline(always)]
pub fn unpack(nib: &[u8], offset: i8, out: &mut [i8]) {
    debug_assert_eq!(out.len(), 2 * nib.len());
    for (src, dst) in nib.chunks_exact(NIB).zip(out.chunks_exact_mut(QK)) {
        let (lo, hi) = dst.split_at_mut(NIB);
        for (o, &b) in lo.iter_mut().zip(src) {
            *o = (b & 0x0f) as i8 - offset;
        }
        for (o, &b) in hi.iter_mut().zip(src) {
            *o = (b >> 4) as i8 - offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{self, GgmlType};
    use test_support::seeded_noise as seeded;

    /// A block through the rule, packed as a GGUF file holds it, and read by the GGUF reader.
    fn through_file(ty: GgmlType, values: &[f32]) -> Vec<f32> {
        let bytes = gguf::writer::quantize(ty, values);
        gguf::dequantize(ty, &bytes, values.len())
    }

    #[test]
    fn q4_0_keeps_the_largest_value_and_rounds_the_rest_to_a_step() {
        for seed in 0..50 {
            let v = seeded(QK, 700 + seed, 2.0);
            let back = through_file(GgmlType::Q4_0, &v);
            let k = (0..QK)
                .max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()))
                .unwrap();
            let d = half::f16::from_f32(v[k] / -8.0).to_f32();
            // The extreme comes back up to the f16 rounding of its scale.
            assert!((back[k] - v[k]).abs() <= 8.0 * (d - v[k] / -8.0).abs() + 1e-6);
            for (a, b) in v.iter().zip(&back) {
                // Half a step, plus the f16 rounding of the scale over at most 8 steps; a whole
                // step for values on the far side past 7.5 steps, which the rule clamps to
                // `q = 15` (7 steps: its range is -8..=7).
                let steps = if a / (v[k] / -8.0) > 7.5 { 1.0 } else { 0.5 };
                let tol = steps * d.abs() + 8.0 * (d - v[k] / -8.0).abs() + 1e-6;
                assert!((a - b).abs() <= tol, "seed {seed}: {a} vs {b} (tol {tol})");
            }
        }
    }

    #[test]
    fn q4_1_spans_min_to_max_in_fifteen_steps() {
        for seed in 0..50 {
            let v = seeded(QK, 800 + seed, 2.0);
            let back = through_file(GgmlType::Q4_1, &v);
            let lo = v.iter().fold(f32::MAX, |a, &b| a.min(b));
            let hi = v.iter().fold(f32::MIN, |a, &b| a.max(b));
            let d = (hi - lo) / 15.0;
            for (a, b) in v.iter().zip(&back) {
                // Half a step, plus the f16 rounding of d (over 15 steps) and of m.
                let tol = 0.5 * d + 15.0 * d * 1e-3 + lo.abs() * 1e-3 + 1e-6;
                assert!((a - b).abs() <= tol, "seed {seed}: {a} vs {b} (tol {tol})");
            }
        }
    }

    #[test]
    fn both_rules_are_idempotent_on_their_own_output() {
        // A 4-bit file read back and quantized again gives the same blocks, so a Q4 model held
        // quantized loses nothing more than the file did.
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            for seed in 0..50 {
                let v = seeded(QK, 900 + seed, 1.5);
                let bytes = gguf::writer::quantize(ty, &v);
                let back = gguf::dequantize(ty, &bytes, QK);
                assert_eq!(
                    gguf::writer::quantize(ty, &back),
                    bytes,
                    "{ty:?} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn odd_blocks_quantize_without_panicking() {
        // All zeros, a constant, a short block, and non-finite values: no panic, every nibble
        // in range, and zeros come back as zeros.
        let mut nib = [0u8; NIB];
        assert_eq!(quantize_block_q4_0(&[0.0; QK], &mut nib), 0.0);
        assert!(nib.iter().all(|&b| b == 0x88));
        let (d, m) = quantize_block_q4_1(&[0.25; QK], &mut nib);
        assert_eq!((d, m), (0.0, 0.25));
        assert!(nib.iter().all(|&b| b == 0));
        quantize_block_q4_0(&seeded(13, 4, 1.0), &mut nib);
        let mut bad = seeded(QK, 5, 1.0);
        bad[3] = f32::NAN;
        bad[9] = f32::INFINITY;
        quantize_block_q4_0(&bad, &mut nib);
        quantize_block_q4_1(&bad, &mut nib);
    }

    #[test]
    fn unpacking_gives_the_values_in_file_order() {
        let nib: Vec<u8> = (0..2 * NIB as u8).map(|k| k.wrapping_mul(37)).collect();
        let mut out = vec![0i8; 4 * NIB];
        unpack(&nib, 8, &mut out);
        for b in 0..2 {
            for j in 0..NIB {
                let byte = nib[b * NIB + j];
                assert_eq!(out[b * QK + j], (byte & 15) as i8 - 8);
                assert_eq!(out[b * QK + NIB + j], (byte >> 4) as i8 - 8);
            }
        }
        unpack(&nib, 0, &mut out);
        assert!(out.iter().all(|&v| (0..16).contains(&v)));
    }
}
