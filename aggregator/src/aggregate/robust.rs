//! Robust aggregation: norm clipping of an update, the norm screening threshold, and the
//! coordinate-wise median and trimmed
//! mean of the zero-padded effective factors over the devices holding each coordinate (these
//! buffer every update until the round closes).

use std::borrow::Cow;

use protocol::{layer_index_map, AdapterPayload, KeptIndices, ModelDims};

use super::config::{AggregationConfig, AggregationMethod};
use super::contribution::f32_data;
use super::global::{slot_layer, zero_layer, GlobalLayer};

/// The factor an update with total delta norm `delta_norm` is scaled by: `clip_norm /
/// delta_norm` when it exceeds `clip_norm`, else 1.
pub(super) fn clip_factor(delta_norm: f64, clip_norm: Option<f64>) -> f64 {
    match clip_norm {
        Some(limit) if delta_norm > limit => limit / delta_norm,
        _ => 1.0,
    }
}

/// Fewest updates norm screening judges: with two, a ten-fold update sets half the median.
pub const SCREEN_MIN_UPDATES: usize = 3;

/// Norm screening's limit on a round's total delta norms `norms`: `factor` times their median
/// (the mean of the two middle values for an even count). Infinite (nothing screened) for
/// fewer than [`SCREEN_MIN_UPDATES`] norms or a zero median (most updates are empty; a limit of
/// zero would leave out every update that is not).
pub(super) fn screen_limit(norms: &[f64], factor: f64) -> f64 {
    if norms.len() < SCREEN_MIN_UPDATES {
        return f64::INFINITY;
    }
    let mut sorted = norms.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    if median > 0.0 {
        factor * median
    } else {
        f64::INFINITY
    }
}

/// A validated update kept for the buffering methods.
pub(super) struct Buffered {
    pub(super) adapter: AdapterPayload,
    pub(super) kept: KeptIndices,
    /// Multiplier on each factor: `sqrt(s * clip_factor)`.
    pub(super) factor_mult: f64,
}

/// The robust statistic of `values` (non-empty): median or trimmed mean.
fn robust_stat(values: &mut [f32], config: &AggregationConfig) -> f32 {
    let n = values.len();
    match config.method {
        AggregationMethod::TrimmedMean => {
            let trim_fraction = config.trim_fraction;
            values.sort_unstable_by(f32::total_cmp);
            let mut t = (trim_fraction * n as f64).floor() as usize;
            if 2 * t >= n {
                t = (n - 1) / 2;
            }
            let kept = &values[t..n - t];
            (kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64) as f32
        }
        _ => {
            let mid = n / 2;
            let (lower, upper, _) = values.select_nth_unstable_by(mid, f32::total_cmp);
            let upper = *upper;
            if n % 2 == 1 {
                upper
            } else {
                let below = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                ((below as f64 + upper as f64) / 2.0) as f32
            }
        }
    }
}

/// One holder of a layer, prepared for coordinate-wise gathering.
struct Holder<'a> {
    a: Cow<'a, [f32]>,
    b: Cow<'a, [f32]>,
    rank: usize,
    in_k: usize,
    mult: f32,
    /// Full column -> local column (`u32::MAX` when absent).
    col_pos: Vec<u32>,
    /// Full row -> local row (`u32::MAX` when absent).
    row_pos: Vec<u32>,
}

/// The layer as the coordinate-wise median or trimmed mean of the updates holding each
/// coordinate; coordinates no update held keep their value in `prev`.
pub(super) fn finish_robust_layer(
    dims: &ModelDims,
    slot: usize,
    updates: &[Buffered],
    prev: Option<&GlobalLayer>,
    rank: u32,
    config: &AggregationConfig,
) -> GlobalLayer {
    let (block, proj) = slot_layer(slot);
    let (out_full, in_full) = dims.full_shape(proj);
    let mut holders = Vec::new();
    for u in updates {
        let Some(layer) = u
            .adapter
            .layers
            .iter()
            .find(|l| l.block == block && l.proj == proj)
        else {
            continue;
        };
        let map = layer_index_map(dims, proj, &u.kept.blocks[block as usize]);
        if map.rows.is_empty() || map.cols.is_empty() {
            continue;
        }
        let mut col_pos = vec![u32::MAX; in_full];
        for (jl, &c) in map.cols.iter().enumerate() {
            col_pos[c as usize] = jl as u32;
        }
        let mut row_pos = vec![u32::MAX; out_full];
        for (ol, &o) in map.rows.iter().enumerate() {
            row_pos[o as usize] = ol as u32;
        }
        holders.push(Holder {
            a: f32_data(&layer.a.data),
            b: f32_data(&layer.b.data),
            rank: layer.a.rows as usize,
            in_k: map.cols.len(),
            mult: u.factor_mult as f32,
            col_pos,
            row_pos,
        });
    }
    let mut out_layer = prev
        .cloned()
        .unwrap_or_else(|| zero_layer(dims, slot, rank));
    if holders.is_empty() {
        return out_layer;
    }
    let r = rank as usize;
    let mut scratch = Vec::with_capacity(holders.len());
    let mut present: Vec<(&Holder, usize)> = Vec::with_capacity(holders.len());
    for j in 0..in_full {
        present.clear();
        present.extend(
            holders
                .iter()
                .filter(|h| h.col_pos[j] != u32::MAX)
                .map(|h| (h, h.col_pos[j] as usize)),
        );
        if present.is_empty() {
            continue;
        }
        for i in 0..r {
            scratch.clear();
            scratch.extend(present.iter().map(|(h, jl)| {
                if i < h.rank {
                    h.a[i * h.in_k + jl] * h.mult
                } else {
                    0.0
                }
            }));
            out_layer.a[i * in_full + j] = robust_stat(&mut scratch, config);
        }
    }
    for o in 0..out_full {
        present.clear();
        present.extend(
            holders
                .iter()
                .filter(|h| h.row_pos[o] != u32::MAX)
                .map(|h| (h, h.row_pos[o] as usize)),
        );
        if present.is_empty() {
            continue;
        }
        for i in 0..r {
            scratch.clear();
            scratch.extend(present.iter().map(|(h, ol)| {
                if i < h.rank {
                    h.b[ol * h.rank + i] * h.mult
                } else {
                    0.0
                }
            }));
            out_layer.b[o * r + i] = robust_stat(&mut scratch, config);
        }
    }
    out_layer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screening_limit_is_k_times_the_median_and_off_where_the_median_says_nothing() {
        assert_eq!(screen_limit(&[2.0, 30.0, 1.0], 3.0), 6.0);
        assert_eq!(screen_limit(&[2.0, 30.0, 1.0, 4.0], 3.0), 9.0);
        // Two updates: a ten-fold one would set half the median.
        assert_eq!(screen_limit(&[1.0, 10.0], 3.0), f64::INFINITY);
        assert_eq!(screen_limit(&[], 3.0), f64::INFINITY);
        // Mostly empty updates: a zero limit would leave out every update that is not.
        assert_eq!(screen_limit(&[0.0, 0.0, 5.0], 3.0), f64::INFINITY);
    }
}
