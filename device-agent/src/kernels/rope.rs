//! Rotary position embedding over the rows of a projection's output in one pass.
//!
//! Written with burn's operations (`x * cos + cat(-x2, x1) * sin` on `[batch, heads, seq, hd]`,
//! as [`crate::model::Rope::apply`] does for other backends) a rotation is five passes over
//! the tensor, each with its own output, and its backward pass as many again: 3.8% of a LoRA
//! step on the AMX host (`-- profile`, 130 ms of 3.4 s) for about a million values per block.
//! Here the rows are `[batch * seq, heads * hd]`, the layout the q and k products leave (before
//! the heads are split), and each half-pair of a head is rotated where it lies. The rotation is
//! orthogonal, so the backward pass is the same pass with the angle negated.
//!
//! The arithmetic is burn's, term by term: the forward pass forms `x1 c + (-x2) s` and
//! `x2 c + x1 s`, the backward pass `dy1 c + dy2 s` and `dy2 c + (-dy1) s` (what burn's autodiff
//! sums through the narrows and the concatenation), so both give the same bits as the
//! operations they replace.

use rayon::prelude::*;

use super::{ELEMS_PER_TASK, ROWS_PER_TASK};

/// Where a block's rows sit: `seq` positions per sequence from `start`, heads of `hd` values
/// side by side in a row; `cos` and `sin` are `[positions, hd]` tables whose two halves of a row
/// are equal ([`crate::model::Rope`]'s).
#[derive(Debug, Clone, Copy)]
pub struct RopeRows<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub hd: usize,
    pub seq: usize,
    pub start: usize,
}

multiversion! {
    /// Rotates rows `first_row..` of a block (`x` and `out` whole rows of `width` values) by
    /// their positions' angles, or by the negated angles when `inverse`.
    fn rope_rows(x: &[f32], out: &mut [f32], width: usize, first_row: usize, at: RopeRows, inverse: bool) {
        let (hd, half) = (at.hd, at.hd / 2);
        for (i, (xr, or)) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)).enumerate() {
            let pos = at.start + (first_row + i) % at.seq;
            let (c, s) = (&at.cos[pos * hd..pos * hd + half], &at.sin[pos * hd..pos * hd + half]);
            for (xh, oh) in xr.chunks_exact(hd).zip(or.chunks_exact_mut(hd)) {
                let (x1, x2) = xh.split_at(half);
                let (o1, o2) = oh.split_at_mut(half);
                if inverse {
                    for j in 0..half {
                        o1[j] = x1[j] * c[j] + x2[j] * s[j];
                        o2[j] = x2[j] * c[j] + -x1[j] * s[j];
                    }
                } else {
                    for j in 0..half {
                        o1[j] = x1[j] * c[j] + -x2[j] * s[j];
                        o2[j] = x2[j] * c[j] + x1[j] * s[j];
                    }
                }
            }
        }
    }
}

/// [`rope_rows`] over a whole block `x` (`[rows, width]`, `width` a multiple of `at.hd`, `rows` a
/// multiple of `at.seq`), into `out`; row-parallel when large.
pub fn rope_into(x: &[f32], out: &mut [f32], width: usize, at: RopeRows, inverse: bool) {
    assert!(
        width > 0 && at.hd > 0 && width.is_multiple_of(at.hd) && at.hd.is_multiple_of(2),
        "rows of {width} values are not whole heads of an even {}",
        at.hd
    );
    assert_eq!(x.len(), out.len(), "RoPE input and output sizes");
    let rows = x.len() / width;
    assert!(
        at.seq > 0 && rows.is_multiple_of(at.seq),
        "{rows} rows are not whole sequences of {}",
        at.seq
    );
    let need = (at.start + at.seq) * at.hd;
    assert!(
        at.cos.len() >= need && at.sin.len() >= need,
        "angle tables hold {} positions, {} needed",
        at.cos.len() / at.hd,
        at.start + at.seq
    );
    if x.len() <= ELEMS_PER_TASK {
        return rope_rows(x, out, width, 0, at, inverse);
    }
    let chunk = width * ROWS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(t, (o, x))| rope_rows(x, o, width, t * ROWS_PER_TASK, at, inverse));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values in [-2, 2).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// Tables shaped as `Rope`'s: `[positions, hd]`, the halves of a row equal.
    fn tables(positions: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for p in 0..positions {
            let row: Vec<(f32, f32)> = (0..hd / 2)
                .map(|i| {
                    let a = p as f64 / 10_000f64.powf(2.0 * i as f64 / hd as f64);
                    (a.cos() as f32, a.sin() as f32)
                })
                .collect();
            for _ in 0..2 {
                c.extend(row.iter().map(|r| r.0));
                s.extend(row.iter().map(|r| r.1));
            }
        }
        (c, s)
    }

    /// Both directions against the rotation written out per value, for a block small enough
    /// for one task and one split into many (two sequences, 3 heads of 8, positions from 5);
    /// the inverse undoes the rotation.
    #[test]
    fn rotation_and_its_inverse_match_the_definition() {
        let (hd, heads) = (8, 3);
        let width = hd * heads;
        for seq in [3, 700] {
            let (cos, sin) = tables(5 + seq, hd);
            let at = RopeRows {
                cos: &cos,
                sin: &sin,
                hd,
                seq,
                start: 5,
            };
            let x = values(2 * seq * width, seq as u32);
            let (mut y, mut back) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            rope_into(&x, &mut y, width, at, false);
            rope_into(&y, &mut back, width, at, true);
            for r in 0..2 * seq {
                let pos = 5 + r % seq;
                for h in 0..heads {
                    for j in 0..hd / 2 {
                        let (c, s) = (cos[pos * hd + j], sin[pos * hd + j]);
                        let at = r * width + h * hd + j;
                        let (a, b) = (x[at], x[at + hd / 2]);
                        assert_eq!(y[at], a * c + -b * s, "row {r}, head {h}, pair {j}");
                        assert_eq!(y[at + hd / 2], b * c + a * s, "row {r}, head {h}, pair {j}");
                    }
                }
            }
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                assert!((a - b).abs() < 1e-5, "value {i}: {a} rotated back to {b}");
            }
        }
    }

    #[test]
    fn a_block_of_partial_sequences_is_refused() {
        let (cos, sin) = tables(8, 4);
        let at = RopeRows {
            cos: &cos,
            sin: &sin,
            hd: 4,
            seq: 3,
            start: 0,
        };
        // Four rows of one head are not whole sequences of three positions.
        let err = std::panic::catch_unwind(|| {
            rope_into(&[0.0; 16], &mut [0.0; 16], 4, at, false);
        })
        .expect_err("a partial sequence is refused");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("4 rows are not whole sequences of 3"), "{msg}");
    }
}
