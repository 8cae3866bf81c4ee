//! HetLoRA and plain-mean aggregation: zero-padded running sums of the effective factors per
//! layer, scattered to full coordinates by the kept maps and divided by the weight of the
//! devices holding each coordinate.
//!
//! # The factors' gauge
//! Averaging `Ã` and `B̃` separately depends on how each update splits its product between
//! them: `(G Ã, B̃ G⁻¹)` has the product of `(Ã, B̃)` for any invertible `r x r` `G`, so it passes
//! every check that measures products (delta norms, their limit, norm screening), yet moves the
//! averaged factors, and their product, by as much as `G` is long (a scalar `c` near the factor
//! norm limit moves a ten-device average about `c / 10` times). So an aggregation fed through
//! [`super::Aggregation::add_against`] with the global adapter the round started from bounds
//! each layer's step: the merged layer's change on the coordinates the round held,
//! `|B̄ Ā - B₀ A₀|_F`, may be at most [`CHANGE_SLACK`] times the root sum of squares of the
//! updates' own changes from the slices they started from (`|B̃_k Ã_k - B₀ₖ A₀ₖ|_F`, gauge-free),
//! which bounds the average of the changes (with any holder weights) when each update keeps the
//! gauge it was sent, up to the second-order cross terms of averaging factors; a layer past it
//! keeps its previous value, and the round counts it. The bound is on the step from the
//! previous global, not on lengths the round's updates inherit from it, so it does not compound.
//!
//! The plainest gauge, a scalar `c`, is repaired before that: an update layer whose `|Ã|_F` is
//! more than [`GAUGE_SLACK`] times (or less than a [`GAUGE_SLACK`]th of) its slice's is folded
//! as `(Ã / ρ, ρ B̃)` with `ρ` that ratio (its product unchanged), so a rescaled honest update
//! counts as the honest update it is instead of freezing the layer. A few local steps move `Ã`
//! far less than that (its start is the slice itself), nor does a rank self-pruned update's
//! change of scale, so honest updates are never rescaled.

use protocol::{layer_index_map, KeptIndices, LayerAdapter, LayerIndexMap, ModelDims};

use super::contribution::{f32_data, factors_product_norm};
use super::global::{zero_layer, GlobalLayer};

/// Added to HetLoRA norm weights so that all-zero updates still average (by sample count).
const NORM_FLOOR: f64 = 1e-30;

/// How far a merged layer's step may exceed the root sum of squares of its updates' own steps
/// (see the module docs).
pub(super) const CHANGE_SLACK: f64 = 4.0;

/// How far an update layer's `|Ã|_F` may sit from its slice's (either way) before its scalar
/// gauge is repaired (see the module docs). HetLoRA's rank self-pruning alone moves it by
/// `sqrt(r / r')` (a rank-16 slice sent back at rank 1: 4x; the effective factors split the new
/// `sqrt(alpha / r')` evenly), so the slack is twice that.
pub(super) const GAUGE_SLACK: f64 = 8.0;

/// Relative room for rounding: a round whose updates did not train (their steps are rounding of
/// the slices' gauge) is not bounded for the rounding of its average.
const CHANGE_ROUNDING: f64 = 1e-5;

/// HetLoRA (or plain mean) running sums of one layer.
pub(super) struct MeanLayer {
    /// `[max_rank, in_full]`.
    a_sum: Vec<f64>,
    /// Holder weight per full input column.
    a_weight: Vec<f64>,
    /// `[out_full, max_rank]`.
    b_sum: Vec<f64>,
    /// Holder weight per full output row.
    b_weight: Vec<f64>,
    /// Sum over folded updates of their squared steps from their slices (see the module docs).
    step_sq: f64,
    /// Sum over folded updates of their squared (clipped) products `|s B A|_F²`.
    product_sq: f64,
}

impl MeanLayer {
    /// Empty sums of a layer of full shape `[out_full, in_full]`.
    pub(super) fn new(out_full: usize, in_full: usize, max_rank: usize) -> MeanLayer {
        MeanLayer {
            a_sum: vec![0.0; max_rank * in_full],
            a_weight: vec![0.0; in_full],
            b_sum: vec![0.0; out_full * max_rank],
            b_weight: vec![0.0; out_full],
            step_sq: 0.0,
            product_sq: 0.0,
        }
    }

    /// Bytes held.
    pub(super) fn state_bytes(&self) -> usize {
        8 * (self.a_sum.len() + self.a_weight.len() + self.b_sum.len() + self.b_weight.len())
    }
}

/// HetLoRA's weight of one device layer: its delta norm `|s B A|_F` after clipping (floored, so
/// all-zero updates still average), times its sample weight.
pub(super) fn hetlora_weight(norm: f64, clip_factor: f64, sample_weight: f64) -> f64 {
    (norm * clip_factor + NORM_FLOOR) * sample_weight
}

/// Scatters one device layer into the sums: `value_mult` times its factors at the coordinates
/// it holds (rank components past its own stay zero: HetLoRA's padding), `weight` onto their
/// holder weights; `gauge` divides its `A` and multiplies its `B` (1 but for a repaired scalar
/// gauge). `(step, product)`: its step from its slice ([`layer_step`]) and its clipped
/// `|s B A|_F`, for the bound of [`finish_mean_layer`].
#[allow(clippy::too_many_arguments)]
pub(super) fn add_mean_layer(
    dims: &ModelDims,
    acc: &mut MeanLayer,
    layer: &LayerAdapter,
    kept: &KeptIndices,
    value_mult: f64,
    weight: f64,
    max_rank: usize,
    gauge: f64,
    (step, product): (f64, f64),
) {
    let map = layer_index_map(dims, layer.proj, &kept.blocks[layer.block as usize]);
    if map.rows.is_empty() || map.cols.is_empty() {
        return;
    }
    acc.step_sq += step * step;
    acc.product_sq += product * product;
    let (_, in_full) = dims.full_shape(layer.proj);
    let r = layer.a.rows as usize;
    let in_k = map.cols.len();
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    let cols_identity = in_k == in_full;
    // (Exact when `gauge` is 1, so honest sums are what they were without the repair.)
    let (a_mult, b_mult) = (value_mult / gauge, value_mult * gauge);
    for i in 0..r {
        let sum_row = &mut acc.a_sum[i * in_full..(i + 1) * in_full];
        let src = &a[i * in_k..(i + 1) * in_k];
        if cols_identity {
            for (dst, &v) in sum_row.iter_mut().zip(src) {
                *dst += a_mult * v as f64;
            }
        } else {
            for (&v, &c) in src.iter().zip(&map.cols) {
                sum_row[c as usize] += a_mult * v as f64;
            }
        }
    }
    for &c in &map.cols {
        acc.a_weight[c as usize] += weight;
    }
    for (ol, &o) in map.rows.iter().enumerate() {
        let o = o as usize;
        let sum_row = &mut acc.b_sum[o * max_rank..o * max_rank + r];
        for (s, &v) in sum_row.iter_mut().zip(&b[ol * r..(ol + 1) * r]) {
            *s += b_mult * v as f64;
        }
        acc.b_weight[o] += weight;
    }
}

/// `|B̃ Ã - B₀ A₀|_F` of one device layer (effective factors: its own times `factor_mult`)
/// against `start`, the global layer (of rank `start_rank`) whose slice it started from, both on
/// the device's kept coordinates and at the device's rank: the gauge-free size of its step; and
/// the gauge to fold it with: `|Ã|_F / |A₀|_F` where that is outside
/// `[1 / GAUGE_SLACK, GAUGE_SLACK]`, else 1 (see the module docs).
pub(super) fn layer_step(
    dims: &ModelDims,
    layer: &LayerAdapter,
    kept: &KeptIndices,
    factor_mult: f64,
    start: &GlobalLayer,
    start_rank: usize,
) -> (f64, f64) {
    let map = layer_index_map(dims, layer.proj, &kept.blocks[layer.block as usize]);
    let (_, in_full) = dims.full_shape(layer.proj);
    let r = layer.a.rows as usize;
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    let mult = factor_mult as f32;
    let from_start = r.min(start_rank);
    // `[Ã; A₀]` (2r x in_k) and `[B̃, -B₀]` (out_k x 2r): their product is the step.
    let mut a_cat: Vec<f32> = a.iter().map(|&x| x * mult).collect();
    a_cat.resize(2 * r * map.cols.len(), 0.0);
    let in_k = map.cols.len();
    for k in 0..from_start {
        let src = &start.a[k * in_full..(k + 1) * in_full];
        for (dst, &c) in a_cat[(r + k) * in_k..(r + k + 1) * in_k]
            .iter_mut()
            .zip(&map.cols)
        {
            *dst = src[c as usize];
        }
    }
    let mut b_cat = vec![0.0f32; map.rows.len() * 2 * r];
    for (ol, &o) in map.rows.iter().enumerate() {
        let row = &mut b_cat[ol * 2 * r..(ol + 1) * 2 * r];
        for (dst, &v) in row[..r].iter_mut().zip(&b[ol * r..(ol + 1) * r]) {
            *dst = v * mult;
        }
        let src = &start.b[o as usize * start_rank..o as usize * start_rank + from_start];
        for (dst, &v) in row[r..r + from_start].iter_mut().zip(src) {
            *dst = -v;
        }
    }
    let (own, slice) = a_cat.split_at(r * in_k);
    let ratio = l2(own) / l2(slice);
    let gauge = if ratio.is_finite()
        && ratio > 0.0
        && !(1.0 / GAUGE_SLACK..=GAUGE_SLACK).contains(&ratio)
    {
        ratio
    } else {
        1.0
    };
    let step = factors_product_norm(&a_cat, &b_cat, 2 * r, in_k, map.rows.len());
    (step, gauge)
}

/// `|x|_2` in `f64`.
fn l2(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// The averaged layer: sums divided by holder weights; coordinates no device held keep their
/// value in `prev`. With `bounded` (the updates were added against `prev`), a layer whose step
/// exceeds the bound of the module docs is `prev` unchanged instead, and the `bool` says so.
pub(super) fn finish_mean_layer(
    dims: &ModelDims,
    slot: usize,
    acc: Option<MeanLayer>,
    prev: Option<&GlobalLayer>,
    rank: u32,
    bounded: bool,
) -> (GlobalLayer, bool) {
    let start = prev
        .cloned()
        .unwrap_or_else(|| zero_layer(dims, slot, rank));
    let mut out_layer = start.clone();
    let Some(acc) = acc else {
        return (out_layer, false);
    };
    let (_, in_full) = dims.full_shape(out_layer.proj);
    let r = rank as usize;
    for i in 0..r {
        for (j, &w) in acc.a_weight.iter().enumerate() {
            if w > 0.0 {
                out_layer.a[i * in_full + j] = (acc.a_sum[i * in_full + j] / w) as f32;
            }
        }
    }
    for (o, &w) in acc.b_weight.iter().enumerate() {
        if w > 0.0 {
            for i in 0..r {
                out_layer.b[o * r + i] = (acc.b_sum[o * r + i] / w) as f32;
            }
        }
    }
    if bounded {
        let held = held_map(&acc);
        let step = held_step(&out_layer, &start, &held, r, in_full);
        let limit = CHANGE_SLACK * acc.step_sq.sqrt() + CHANGE_ROUNDING * acc.product_sq.sqrt();
        if step > limit {
            return (start, true);
        }
    }
    (out_layer, false)
}

/// The coordinates some update held: rows with holder weight (`rows`), columns likewise.
fn held_map(acc: &MeanLayer) -> LayerIndexMap {
    let held = |w: &[f64]| {
        w.iter()
            .enumerate()
            .filter(|(_, &x)| x > 0.0)
            .map(|(i, _)| i as u32)
            .collect()
    };
    LayerIndexMap {
        rows: held(&acc.b_weight),
        cols: held(&acc.a_weight),
    }
}

/// `|B̄ Ā - B₀ A₀|_F` on the held coordinates, both layers of rank `r`.
fn held_step(
    merged: &GlobalLayer,
    start: &GlobalLayer,
    held: &LayerIndexMap,
    r: usize,
    in_full: usize,
) -> f64 {
    let in_k = held.cols.len();
    let mut a_cat = vec![0.0f32; 2 * r * in_k];
    for (k, layer) in [(0, merged), (r, start)] {
        for i in 0..r {
            let src = &layer.a[i * in_full..(i + 1) * in_full];
            let dst = &mut a_cat[(k + i) * in_k..(k + i + 1) * in_k];
            for (d, &c) in dst.iter_mut().zip(&held.cols) {
                *d = src[c as usize];
            }
        }
    }
    let mut b_cat = vec![0.0f32; held.rows.len() * 2 * r];
    for (ol, &o) in held.rows.iter().enumerate() {
        let o = o as usize;
        let row = &mut b_cat[ol * 2 * r..(ol + 1) * 2 * r];
        row[..r].copy_from_slice(&merged.b[o * r..(o + 1) * r]);
        for (d, &v) in row[r..].iter_mut().zip(&start.b[o * r..(o + 1) * r]) {
            *d = -v;
        }
    }
    factors_product_norm(&a_cat, &b_cat, 2 * r, in_k, held.rows.len())
}
