//! HetLoRA and plain-mean aggregation: zero-padded running sums of the effective factors per
//! layer, scattered to full coordinates by the kept maps and divided by the weight of the
//! devices holding each coordinate.

use protocol::{layer_index_map, KeptIndices, LayerAdapter, ModelDims};

use super::contribution::f32_data;
use super::global::{zero_layer, GlobalLayer};

/// Added to HetLoRA norm weights so that all-zero updates still average (by sample count).
const NORM_FLOOR: f64 = 1e-30;

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
}

impl MeanLayer {
    /// Empty sums of a layer of full shape `[out_full, in_full]`.
    pub(super) fn new(out_full: usize, in_full: usize, max_rank: usize) -> MeanLayer {
        MeanLayer {
            a_sum: vec![0.0; max_rank * in_full],
            a_weight: vec![0.0; in_full],
            b_sum: vec![0.0; out_full * max_rank],
            b_weight: vec![0.0; out_full],
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
/// holder weights.
pub(super) fn add_mean_layer(
    dims: &ModelDims,
    acc: &mut MeanLayer,
    layer: &LayerAdapter,
    kept: &KeptIndices,
    value_mult: f64,
    weight: f64,
    max_rank: usize,
) {
    let map = layer_index_map(dims, layer.proj, &kept.blocks[layer.block as usize]);
    if map.rows.is_empty() || map.cols.is_empty() {
        return;
    }
    let (_, in_full) = dims.full_shape(layer.proj);
    let r = layer.a.rows as usize;
    let in_k = map.cols.len();
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    let cols_identity = in_k == in_full;
    for i in 0..r {
        let sum_row = &mut acc.a_sum[i * in_full..(i + 1) * in_full];
        let src = &a[i * in_k..(i + 1) * in_k];
        if cols_identity {
            for (dst, &v) in sum_row.iter_mut().zip(src) {
                *dst += value_mult * v as f64;
            }
        } else {
            for (&v, &c) in src.iter().zip(&map.cols) {
                sum_row[c as usize] += value_mult * v as f64;
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
            *s += value_mult * v as f64;
        }
        acc.b_weight[o] += weight;
    }
}

/// The averaged layer: sums divided by holder weights; coordinates no device held keep their
/// value in `prev`.
pub(super) fn finish_mean_layer(
    dims: &ModelDims,
    slot: usize,
    acc: Option<MeanLayer>,
    prev: Option<&GlobalLayer>,
    rank: u32,
) -> GlobalLayer {
    let mut out_layer = prev
        .cloned()
        .unwrap_or_else(|| zero_layer(dims, slot, rank));
    let Some(acc) = acc else {
        return out_layer;
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
    out_layer
}
