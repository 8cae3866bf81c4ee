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

/// `|s B A|_F` of a validated layer, from the `r x r` Gram matrices (no `[out, in]` product):
/// `|B A|_F² = Σ_ij (BᵀB)_ij (A Aᵀ)_ij`.
pub fn layer_delta_norm(layer: &LayerAdapter, scale: f64) -> f64 {
    let r = layer.a.rows as usize;
    let inp = layer.a.cols as usize;
    let out = layer.b.rows as usize;
    let a = f32_data(&layer.a.data);
    let b = f32_data(&layer.b.data);
    if layer.b.cols as usize != r || a.len() != r * inp || b.len() != out * r {
        return f64::NAN;
    }
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
    let sq: f64 = gram_a.iter().zip(&gram_b).map(|(x, y)| x * y).sum();
    scale.abs() * sq.max(0.0).sqrt()
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
