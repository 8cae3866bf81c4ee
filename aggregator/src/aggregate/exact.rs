//! Exact (FlexLoRA-style) aggregation: the weighted sum of the devices' weight deltas
//! `s B A` per layer in full coordinates, re-factored at the global rank by a thin or
//! randomised SVD.

use faer::{Mat, MatRef};
use protocol::{KeptIndices, LayerAdapter, LayerIndexMap, ModelDims, Side};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{AggregationConfig, SvdMode};
use super::contribution::f32_data;
use super::error::AggregateError;
use super::global::{slot_layer, zero_layer, GlobalLayer};

/// Exact-method running sum of one layer.
pub(super) struct ExactLayer {
    /// `Σ w_k s_k B_k A_k`, `[out_full, in_full]`.
    sum: Vec<f32>,
    /// Holder weight along the pruned side.
    weight: Vec<f64>,
}

impl ExactLayer {
    /// An empty sum of a layer of full shape `[out_full, in_full]`, pruned on a side of length
    /// `side`.
    pub(super) fn new(out_full: usize, in_full: usize, side: usize) -> ExactLayer {
        ExactLayer {
            sum: vec![0.0; out_full * in_full],
            weight: vec![0.0; side],
        }
    }

    /// Bytes held.
    pub(super) fn state_bytes(&self) -> usize {
        4 * self.sum.len() + 8 * self.weight.len()
    }
}

/// Scatters `product_mult * B A` of one device layer into the dense sum at the coordinates it
/// holds, and `weight` onto their holder weights.
pub(super) fn add_exact_layer(
    dims: &ModelDims,
    acc: &mut ExactLayer,
    layer: &LayerAdapter,
    kept: &KeptIndices,
    product_mult: f32,
    weight: f64,
    map: &mut LayerIndexMap,
) {
    map.fill(dims, layer.proj, &kept.blocks[layer.block as usize]);
    if map.rows.is_empty() || map.cols.is_empty() {
        return;
    }
    let (_, in_full) = dims.full_shape(layer.proj);
    let r = layer.a.rows as usize;
    let (out_k, in_k) = (map.rows.len(), map.cols.len());
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    let a_mat = MatRef::from_row_major_slice(&a, r, in_k);
    let b_mat = MatRef::from_row_major_slice(&b, out_k, r);
    // (B A)ᵀ = Aᵀ Bᵀ in faer's column-major layout: column `o` is row `o` of B A, contiguous.
    let product_t: Mat<f32> = a_mat.transpose() * b_mat.transpose();
    let cols_identity = in_k == in_full;
    for (ol, &o) in map.rows.iter().enumerate() {
        let row = &mut acc.sum[o as usize * in_full..(o as usize + 1) * in_full];
        let src = product_t.col_as_slice(ol);
        if cols_identity {
            for (dst, &v) in row.iter_mut().zip(src) {
                *dst += product_mult * v;
            }
        } else {
            for (&v, &c) in src.iter().zip(&map.cols) {
                row[c as usize] += product_mult * v;
            }
        }
    }
    let held = match layer.proj.pruned_side() {
        Side::Rows => &map.rows,
        Side::Cols => &map.cols,
    };
    for &i in held {
        acc.weight[i as usize] += weight;
    }
}

/// The merged layer: the dense sum divided by holder weights (the previous global delta where
/// no device held a coordinate), re-factored at `rank` by SVD.
pub(super) fn finish_exact_layer(
    dims: &ModelDims,
    slot: usize,
    acc: Option<ExactLayer>,
    prev: Option<&GlobalLayer>,
    rank: u32,
    config: &AggregationConfig,
) -> Result<GlobalLayer, AggregateError> {
    let (block, proj) = slot_layer(slot);
    let Some(acc) = acc else {
        return Ok(prev
            .cloned()
            .unwrap_or_else(|| zero_layer(dims, slot, rank)));
    };
    let (out_full, in_full) = dims.full_shape(proj);
    let r = rank as usize;
    let held = |o: usize, j: usize| match proj.pruned_side() {
        Side::Rows => acc.weight[o],
        Side::Cols => acc.weight[j],
    };
    let mut dense = Mat::<f64>::zeros(out_full, in_full);
    for o in 0..out_full {
        for j in 0..in_full {
            let w = held(o, j);
            dense[(o, j)] = if w > 0.0 {
                acc.sum[o * in_full + j] as f64 / w
            } else if let Some(p) = prev {
                (0..r)
                    .map(|i| p.b[o * r + i] as f64 * p.a[i * in_full + j] as f64)
                    .sum()
            } else {
                0.0
            };
        }
    }
    drop(acc);
    let (u, s, v) =
        top_singular(dense, r, config, slot as u64).map_err(|e| AggregateError::Svd {
            block,
            proj,
            detail: format!("{e:?}"),
        })?;
    let mut a = vec![0.0f32; r * in_full];
    let mut b = vec![0.0f32; out_full * r];
    for (i, &sigma) in s.iter().enumerate() {
        let root = sigma.max(0.0).sqrt();
        for j in 0..in_full {
            a[i * in_full + j] = (root * v[(j, i)]) as f32;
        }
        for o in 0..out_full {
            b[o * r + i] = (u[(o, i)] * root) as f32;
        }
    }
    Ok(GlobalLayer { block, proj, a, b })
}

/// Left singular vectors (columns), singular values, right singular vectors (columns).
type Triplets = (Mat<f64>, Vec<f64>, Mat<f64>);

/// The top `min(r, rank)` singular triplets `(U, S, V)` of `m`, largest first.
fn top_singular(
    m: Mat<f64>,
    r: usize,
    config: &AggregationConfig,
    seed: u64,
) -> Result<Triplets, faer::linalg::svd::SvdError> {
    let min_dim = m.nrows().min(m.ncols());
    let k = r.min(min_dim);
    let probes = match config.svd {
        SvdMode::Randomized => (r + config.svd_oversample as usize).min(min_dim),
        SvdMode::Full => min_dim,
    };
    if config.svd == SvdMode::Randomized && probes < min_dim {
        let mut rng = ChaCha8Rng::seed_from_u64(0x005E_ED0F_5EED ^ seed);
        let omega = Mat::<f64>::from_fn(m.ncols(), probes, |_, _| rng.random_range(-1.0..1.0));
        let mut q = (m.as_ref() * omega.as_ref()).qr().compute_thin_Q();
        for _ in 0..config.svd_power_iters {
            let z = (m.as_ref().transpose() * q.as_ref()).qr().compute_thin_Q();
            q = (m.as_ref() * z.as_ref()).qr().compute_thin_Q();
        }
        let small = q.as_ref().transpose() * m.as_ref();
        let svd = small.thin_svd()?;
        let u = q.as_ref() * svd.U().subcols(0, k);
        let s = (0..k).map(|i| svd.S().column_vector()[i]).collect();
        return Ok((u, s, svd.V().subcols(0, k).to_owned()));
    }
    let svd = m.thin_svd()?;
    let s = (0..k).map(|i| svd.S().column_vector()[i]).collect();
    Ok((
        svd.U().subcols(0, k).to_owned(),
        s,
        svd.V().subcols(0, k).to_owned(),
    ))
}
