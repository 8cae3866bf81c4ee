//! One device's update as the aggregation consumes it: the contribution, its validation and
//! delta norms (checked before it touches any accumulator), and `f32` views of its buffers.

use std::borrow::Cow;

use protocol::{
    validate_adapter, AdapterPayload, Buffer, DeviceId, KeptIndices, LayerAdapter, ModelDims,
    ValidationLimits,
};

use super::config::AggregationConfig;
use super::error::AggregateError;

/// One device's update as the aggregation consumes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub device: DeviceId,
    pub adapter: AdapterPayload,
    pub kept: KeptIndices,
    /// Training samples behind the update (its data-size weight).
    pub samples: u64,
}

/// What [`check_contribution`] measured on an acceptable update.
#[derive(Clone, Debug, PartialEq)]
pub struct ContributionCheck {
    /// `|s B A|_F` per entry of `adapter.layers`, before clipping.
    pub layer_delta_norms: Vec<f64>,
    /// `sqrt(Σ layer_delta_norms²)`, before clipping.
    pub delta_norm: f64,
}

/// Accepted-update summary returned by [`crate::aggregate::Aggregation::add`].
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// Total delta norm before clipping (the `|B A|_F` of the reward).
    pub delta_norm: f64,
    /// The factor the delta was scaled by (1 when not clipped).
    pub clip_factor: f64,
}

/// The `f32` values of a buffer (borrowed when it already is `f32`).
pub(super) fn f32_data(buffer: &Buffer) -> Cow<'_, [f32]> {
    match buffer {
        Buffer::F32(v) => Cow::Borrowed(v),
        other => Cow::Owned(other.to_f32_vec()),
    }
}

/// `|s B A|_F` of a validated layer without forming the `[out, in]` product when the factors are
/// wide: `|B A|_F² = Σ_ij (BᵀB)_ij (A Aᵀ)_ij` from the `r x r` Gram matrices, about
/// `r² (in/2 + out)` multiplications. Factors narrower than their rank (tiny models at high
/// rank) take the product row by row instead, `r in out` multiplications, when that is fewer.
pub fn layer_delta_norm(layer: &LayerAdapter, scale: f64) -> f64 {
    let r = layer.a.rows as usize;
    let inp = layer.a.cols as usize;
    let out = layer.b.rows as usize;
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    if layer.b.cols as usize != r || a.len() != r * inp || b.len() != out * r {
        return f64::NAN;
    }
    scale.abs() * factors_product_norm(&a, &b, r, inp, out)
}

/// `|B A|_F` of factors `a` (`[r, inp]`) and `b` (`[out, r]`), row-major, by whichever of the
/// two routes of [`layer_delta_norm`] costs fewer multiplications.
pub(super) fn factors_product_norm(a: &[f32], b: &[f32], r: usize, inp: usize, out: usize) -> f64 {
    let sq = if inp * out < r * (inp / 2 + out) {
        product_norm_sq(a, b, r, inp)
    } else {
        gram_norm_sq(a, b, r, inp, out)
    };
    sq.max(0.0).sqrt()
}

/// `|B A|_F²` from the Gram matrices (`a`: `[r, inp]`, `b`: `[out, r]`, row-major), every sum
/// in index order (the tests hold it to a plain loop bit for bit). Compiled for the widest
/// vector set the CPU offers (AVX2 on x86-64 where present, else the portable build's): each
/// loop adds element-wise into independent sums, and Rust never fuses a multiply and an add,
/// so the width changes no bit, only how many sums advance per instruction.
fn gram_norm_sq(a: &[f32], b: &[f32], r: usize, inp: usize, out: usize) -> f64 {
    pulp::Arch::new().dispatch(GramNormSq { a, b, r, inp, out })
}

struct GramNormSq<'a> {
    a: &'a [f32],
    b: &'a [f32],
    r: usize,
    inp: usize,
    out: usize,
}

impl pulp::WithSimd for GramNormSq<'_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f64 {
        gram_norm_sq_in_order(self.a, self.b, self.r, self.inp, self.out)
    }
}

#[inline(always)]
fn gram_norm_sq_in_order(a: &[f32], b: &[f32], r: usize, inp: usize, out: usize) -> f64 {
    // `A` column-major in f64: the r(r+1)/2 dot products of `A Aᵀ` advance one column at a
    // time, side by side, each still summed over the columns in order (independent chains the
    // CPU overlaps, instead of one dependent chain per dot product).
    let mut at = vec![0.0f64; inp * r];
    for (i, ai) in a.chunks_exact(inp.max(1)).take(r).enumerate() {
        for (k, &x) in ai.iter().enumerate() {
            at[k * r + i] = x as f64;
        }
    }
    // The same neutral element as `Iterator::sum`, so that all-zero sums keep their sign.
    let start: f64 = std::iter::empty::<f64>().sum();
    let mut gram_a = vec![start; r * r];
    for col in at.chunks_exact(r.max(1)) {
        for (i, &x) in col.iter().enumerate() {
            for (g, &y) in gram_a[i * r + i..(i + 1) * r].iter_mut().zip(&col[i..]) {
                *g += x * y;
            }
        }
    }
    // `B Bᵀ`'s upper triangle, then mirrored. Entry (i, j) skips the rows where `b_i` is zero
    // and (j, i) those where `b_j` is: they differ only by products `±0` added to a sum that
    // starts at `+0` (which leaves it as it is: a nonzero sum unchanged, a zero one `+0`), so
    // with the finite values a validated update holds the two are the same bits.
    let mut gram_b = vec![0.0f64; r * r];
    for row in b.chunks_exact(r.max(1)).take(out) {
        for (i, &bi) in row.iter().enumerate() {
            if bi != 0.0 {
                let bi = bi as f64;
                for (g, &bj) in gram_b[i * r + i..(i + 1) * r].iter_mut().zip(&row[i..]) {
                    *g += bi * bj as f64;
                }
            }
        }
    }
    for i in 0..r {
        for j in 0..i {
            gram_a[i * r + j] = gram_a[j * r + i];
            gram_b[i * r + j] = gram_b[j * r + i];
        }
    }
    gram_a.iter().zip(&gram_b).map(|(x, y)| x * y).sum()
}

/// `|B A|_F²` from the product, one output row at a time.
fn product_norm_sq(a: &[f32], b: &[f32], r: usize, inp: usize) -> f64 {
    let mut row = vec![0.0f64; inp];
    let mut sq = 0.0;
    for b_row in b.chunks_exact(r.max(1)) {
        row.iter_mut().for_each(|x| *x = 0.0);
        for (&bk, a_k) in b_row.iter().zip(a.chunks_exact(inp.max(1))) {
            if bk != 0.0 {
                let bk = bk as f64;
                for (x, &ak) in row.iter_mut().zip(a_k) {
                    *x += bk * ak as f64;
                }
            }
        }
        sq += row.iter().map(|x| x * x).sum::<f64>();
    }
    sq
}

/// Total delta norm `sqrt(Σ_layers |s B A|_F²)` of a validated adapter.
pub fn delta_norm(adapter: &AdapterPayload) -> f64 {
    let s = adapter.scale();
    adapter
        .layers
        .iter()
        .map(|l| layer_delta_norm(l, s).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Validates an update (see [`protocol::validate_adapter`]) against `max_rank` and `config` and
/// measures its delta norms; refuses any layer above `max_layer_delta_norm`. Touches no state.
pub fn check_contribution(
    dims: &ModelDims,
    max_rank: u32,
    config: &AggregationConfig,
    contribution: &Contribution,
) -> Result<ContributionCheck, AggregateError> {
    let limits = ValidationLimits {
        max_rank,
        max_factor_norm: config.max_factor_norm,
    };
    validate_adapter(dims, &contribution.adapter, &contribution.kept, &limits)?;
    let s = contribution.adapter.scale();
    let mut layer_delta_norms = Vec::with_capacity(contribution.adapter.layers.len());
    for l in &contribution.adapter.layers {
        let norm = layer_delta_norm(l, s);
        if norm.is_nan() || norm > config.max_layer_delta_norm {
            return Err(AggregateError::DeltaNormTooLarge {
                block: l.block,
                proj: l.proj,
                norm,
                limit: config.max_layer_delta_norm,
            });
        }
        layer_delta_norms.push(norm);
    }
    let delta_norm = layer_delta_norms.iter().map(|n| n * n).sum::<f64>().sqrt();
    Ok(ContributionCheck {
        layer_delta_norms,
        delta_norm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values, zeros included.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 16;
                if h % 7 == 0 {
                    0.0
                } else {
                    (h % 2001) as f32 / 1000.0 - 1.0
                }
            })
            .collect()
    }

    /// The two norms as first written (indexed loops): the iterator forms above must give the
    /// same bits, or every recorded reward would move.
    fn gram_reference(a: &[f32], b: &[f32], r: usize, inp: usize, out: usize) -> f64 {
        let mut gram_a = vec![0.0f64; r * r];
        for i in 0..r {
            for j in i..r {
                let dot: f64 = a[i * inp..(i + 1) * inp]
                    .iter()
                    .zip(&a[j * inp..(j + 1) * inp])
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum();
                gram_a[i * r + j] = dot;
                gram_a[j * r + i] = dot;
            }
        }
        let mut gram_b = vec![0.0f64; r * r];
        for row in b.chunks_exact(r.max(1)).take(out) {
            for i in 0..r {
                let bi = row[i] as f64;
                if bi != 0.0 {
                    for j in 0..r {
                        gram_b[i * r + j] += bi * row[j] as f64;
                    }
                }
            }
        }
        gram_a.iter().zip(&gram_b).map(|(x, y)| x * y).sum()
    }

    fn product_reference(a: &[f32], b: &[f32], r: usize, inp: usize) -> f64 {
        let mut row = vec![0.0f64; inp];
        let mut sq = 0.0;
        for b_row in b.chunks_exact(r.max(1)) {
            row.iter_mut().for_each(|x| *x = 0.0);
            for (k, &bk) in b_row.iter().enumerate() {
                if bk != 0.0 {
                    for (x, &ak) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                        *x += bk as f64 * ak as f64;
                    }
                }
            }
            sq += row.iter().map(|x| x * x).sum::<f64>();
        }
        sq
    }

    #[test]
    fn both_ways_to_the_delta_norm_agree_with_the_explicit_product() {
        // (rank, in, out): wide factors (Gram), narrow ones (product), and the boundary.
        for (r, inp, out) in [
            (8, 576, 1536),
            (16, 8, 32),
            (16, 4, 4),
            (4, 8, 8),
            (1, 3, 2),
        ] {
            let (a, b) = (values(r * inp, 1), values(out * r, 2));
            let mut want = 0.0f64;
            for o in 0..out {
                for i in 0..inp {
                    let x: f64 = (0..r)
                        .map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64)
                        .sum();
                    want += x * x;
                }
            }
            let gram = gram_norm_sq(&a, &b, r, inp, out);
            let product = product_norm_sq(&a, &b, r, inp);
            assert_eq!(
                gram.to_bits(),
                gram_reference(&a, &b, r, inp, out).to_bits()
            );
            assert_eq!(
                product.to_bits(),
                product_reference(&a, &b, r, inp).to_bits()
            );
            for got in [gram, product] {
                assert!(
                    (got - want).abs() <= 1e-9 * want.max(1.0),
                    "r {r}, in {inp}, out {out}: {got} vs {want}"
                );
            }
            // Signed zeros and zero rows: the sums' neutral element must match too.
            let mut z = a.clone();
            z.iter_mut().step_by(3).for_each(|x| *x = -0.0);
            z[..inp].iter_mut().for_each(|x| *x = 0.0);
            assert_eq!(
                gram_norm_sq(&z, &b, r, inp, out).to_bits(),
                gram_reference(&z, &b, r, inp, out).to_bits()
            );
            // ... and in `B`, whose Gram matrix is computed as a triangle: signed zeros, a
            // zero column and zero rows, which one side of a mirrored pair skips and the
            // other does not.
            let mut zb = b.clone();
            zb.iter_mut().step_by(5).for_each(|x| *x = -0.0);
            zb.iter_mut().skip(r - 1).step_by(r).for_each(|x| *x = 0.0);
            zb[..r].iter_mut().for_each(|x| *x = 0.0);
            for (a, b) in [(&a, &zb), (&z, &zb)] {
                assert_eq!(
                    gram_norm_sq(a, b, r, inp, out).to_bits(),
                    gram_reference(a, b, r, inp, out).to_bits()
                );
            }
            let layer = LayerAdapter {
                block: 0,
                proj: protocol::Proj::Q,
                a: protocol::Tensor2::f32(r as u32, inp as u32, a),
                b: protocol::Tensor2::f32(out as u32, r as u32, b),
            };
            let n = layer_delta_norm(&layer, -0.5);
            assert!((n - 0.5 * want.sqrt()).abs() <= 1e-9 * want.sqrt().max(1.0));
        }
    }
}
