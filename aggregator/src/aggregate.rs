//! Aggregation of heterogeneous-rank, heterogeneously pruned LoRA updates on plain buffers.
//!
//! # Model of an update
//! Device `k` sends factors `A_k` (`[r_k, in_k]`) and `B_k` (`[out_k, r_k]`) per layer, in its
//! pruned local coordinates, with scale `s_k = alpha_k / r_k`. Its kept-index maps say where
//! each local row and column sits in the full model ([`protocol::layer_index_map`]).
//!
//! # Effective factors
//! Devices may use different ranks and therefore different scales, so everything here works on
//! *effective* factors with the scale folded in: `Ã = sqrt(s) A`, `B̃ = sqrt(s) B`, so that
//! `s B A = B̃ Ã`. The [`GlobalAdapter`] stores effective factors in full coordinates at the
//! aggregation's `max_rank`; [`GlobalAdapter::slice_for`] divides by `sqrt(s)` of the receiving
//! device, so a device that does not train sends back exactly what it received.
//!
//! # Scatter and coordinate-wise normalisation
//! A device's values land at its kept coordinates only; pruned coordinates are *absent*, not
//! zero. Every accumulator keeps, next to its sums, the total weight of the devices that hold
//! each coordinate and divides by it: a coordinate held by one device takes that device's value.
//! Rank padding is different: a rank-4 update inside a rank-16 aggregation holds zeros in
//! components 4..16 (HetLoRA's zero padding). A coordinate that no device holds keeps the
//! previous global value (zero if there is none). Each projection is pruned on one side only
//! (see [`protocol::Side`]), so holder weights are a vector along that side.
//!
//! # Methods
//! - [`Method::HetLora`]: zero-pad to `max_rank`, average `Ã` and `B̃` with per-layer weights
//!   `w_k ∝ |B̃_k Ã_k|_F` (times the sample count when `weight_by_samples`), normalised over the
//!   holders of each coordinate; each device later receives the truncation to its rank.
//!   Streaming: running sums of size `max_rank x (in + out)` per layer, whatever the device count.
//! - [`Method::Mean`]: the same zero-padded running sums with weights `w_k` = sample count
//!   (or 1): FedAvg of the factors, the `fedlora` baseline.
//! - [`Method::Exact`] (FlexLoRA-style): `dW = Σ w_k s_k B_k A_k` per layer in full coordinates
//!   (`w_k` = sample count, or 1), normalised over holders, then a thin SVD (faer, `f64`)
//!   re-factors it at `max_rank`: `B̃ = U_r sqrt(S_r)`, `Ã = sqrt(S_r) V_rᵀ`, the square root of
//!   the singular values split evenly between the factors. Since singular triplets are ordered,
//!   truncating to a device's rank is the best rank-`r_k` approximation ([`SvdMode::Randomized`]
//!   trades exactness for speed on large layers). faer runs sequentially, so results do not
//!   depend on thread scheduling. Streaming: one dense
//!   `f32` `[out, in]` running sum per layer (about 425 MB for SmolLM2-135M), whatever the
//!   device count.
//! - [`Method::Median`], [`Method::TrimmedMean`]: coordinate-wise over the holders of each
//!   coordinate of the zero-padded effective factors (unweighted). These must buffer every
//!   update until [`Aggregation::finish`].
//!
//! Every update is validated ([`protocol::validate_adapter`]: shapes, finiteness, factor norms)
//! and its per-layer delta norms `|s B A|_F` checked against `max_layer_delta_norm` *before* it
//! touches any accumulator. Optional norm clipping scales an update whose total delta norm
//! exceeds `clip_norm` down to it.

use std::borrow::Cow;

use faer::{Mat, MatRef};
use protocol::{
    layer_index_map, validate_adapter, validate_kept, AdapterPayload, Buffer, DeviceId,
    GlobalSlice, KeptIndices, LayerAdapter, ModelDims, Proj, RejectReason, Side, Tensor2,
    ValidationError, ValidationLimits,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Added to HetLoRA norm weights so that all-zero updates still average (by sample count).
const NORM_FLOOR: f64 = 1e-30;

/// How updates are combined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Method {
    /// Zero-pad, norm-weighted average of the factors, truncation per device.
    HetLora,
    /// Plain (FedAvg) average of the factors, weighted by sample count when configured: the
    /// `fedlora` baseline. With equal ranks and no pruning it is FedAvg on `A` and `B`.
    Mean,
    /// Weighted average of the weight deltas, re-factored by truncated SVD.
    Exact,
    /// Coordinate-wise median of the factors.
    Median,
    /// Coordinate-wise mean after dropping `trim_fraction` of the values at each end.
    TrimmedMean { trim_fraction: f64 },
}

impl Method {
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Method::HetLora => "hetlora",
            Method::Mean => "mean",
            Method::Exact => "exact",
            Method::Median => "median",
            Method::TrimmedMean { .. } => "trimmed-mean",
        }
    }
}

/// How [`Method::Exact`] re-factors the aggregated delta of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "svd", rename_all = "kebab-case")]
pub enum SvdMode {
    /// faer's thin SVD: the exact top `max_rank` singular triplets.
    Full,
    /// Randomised subspace iteration (Halko, Martinsson and Tropp, 2011): `max_rank +
    /// oversample` seeded random probes, `power_iters` power iterations with re-orthonormalisation,
    /// then an exact SVD of the small projected matrix. Exact when the delta's rank is at most
    /// `max_rank + oversample`, close to the optimal truncation otherwise, and an order of
    /// magnitude faster than `Full` on large layers. Deterministic (probes seeded per layer).
    Randomized { oversample: u32, power_iters: u32 },
}

/// Plain-data settings of an aggregation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AggregateConfig {
    pub method: Method,
    /// Rank of the global adapter; updates of a higher rank are refused.
    pub max_rank: u32,
    /// Scale an update down so that its total delta norm `sqrt(Σ_layers |s B A|_F²)` is at most
    /// this.
    pub clip_norm: Option<f64>,
    /// Refuse an update if any layer's `|s B A|_F` exceeds this.
    pub max_layer_delta_norm: f64,
    /// Refuse an update if any single factor's Frobenius norm exceeds this.
    pub max_factor_norm: f64,
    /// Multiply each device's weight by its sample count.
    pub weight_by_samples: bool,
    /// Re-factoring of [`Method::Exact`].
    pub svd: SvdMode,
}

impl AggregateConfig {
    /// Defaults: no clipping, generous absurd-norm limits, sample-count weighting.
    pub fn new(method: Method, max_rank: u32) -> AggregateConfig {
        AggregateConfig {
            method,
            max_rank,
            clip_norm: None,
            max_layer_delta_norm: 1.0e3,
            max_factor_norm: 1.0e4,
            weight_by_samples: true,
            svd: SvdMode::Full,
        }
    }
}

/// Why an update was refused or an aggregation could not finish.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("invalid update: {0}")]
    Invalid(#[from] ValidationError),
    #[error("layer {block}.{proj}: delta norm {norm} exceeds the limit {limit}")]
    DeltaNormTooLarge {
        block: u32,
        proj: Proj,
        norm: f64,
        limit: f64,
    },
    #[error("the previous global adapter is for {got:?}, this aggregation for {expected:?}")]
    DimsMismatch { expected: ModelDims, got: ModelDims },
    #[error("invalid aggregation config: {0}")]
    Config(String),
    #[error("the previous global adapter is malformed (layers or buffers do not match its dims and rank)")]
    MalformedGlobal,
    #[error("SVD of layer {block}.{proj} failed: {detail}")]
    Svd {
        block: u32,
        proj: Proj,
        detail: String,
    },
}

impl AggregateError {
    /// The reason to send back to a device whose update caused this error.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            AggregateError::Invalid(e) => e.reject_reason(),
            AggregateError::DeltaNormTooLarge { norm, limit, .. } => RejectReason::NormTooLarge {
                norm: *norm,
                limit: *limit,
            },
            other => RejectReason::Malformed(other.to_string()),
        }
    }
}

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

/// Accepted-update summary returned by [`Aggregation::add`].
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// Total delta norm before clipping (the `|B A|_F` of the reward).
    pub delta_norm: f64,
    /// The factor the delta was scaled by (1 when not clipped).
    pub clip_factor: f64,
}

/// Full-coordinate effective factors of one layer (`dW = b @ a`, scale folded in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalLayer {
    pub block: u32,
    pub proj: Proj,
    /// `[rank, in_full]`, row-major.
    pub a: Vec<f32>,
    /// `[out_full, rank]`, row-major.
    pub b: Vec<f32>,
}

/// The global adapter: effective factors of every layer in full coordinates, in canonical order
/// (block-major, then [`Proj::ALL`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalAdapter {
    pub dims: ModelDims,
    pub rank: u32,
    pub layers: Vec<GlobalLayer>,
}

fn layer_slot(block: u32, proj: Proj) -> usize {
    block as usize * Proj::ALL.len() + proj.index()
}

fn slot_layer(slot: usize) -> (u32, Proj) {
    (
        (slot / Proj::ALL.len()) as u32,
        Proj::ALL[slot % Proj::ALL.len()],
    )
}

fn f32_data(buffer: &Buffer) -> Cow<'_, [f32]> {
    match buffer {
        Buffer::F32(v) => Cow::Borrowed(v),
        other => Cow::Owned(other.to_f32_vec()),
    }
}

impl GlobalAdapter {
    /// An all-zero adapter of `rank`.
    pub fn zeros(dims: ModelDims, rank: u32) -> GlobalAdapter {
        let r = rank as usize;
        let layers = (0..dims.n_layers())
            .map(|slot| {
                let (block, proj) = slot_layer(slot);
                let (out, inp) = dims.full_shape(proj);
                GlobalLayer {
                    block,
                    proj,
                    a: vec![0.0; r * inp],
                    b: vec![0.0; out * r],
                }
            })
            .collect();
        GlobalAdapter { dims, rank, layers }
    }

    /// The standard LoRA start: `A` uniform in `±1/sqrt(in)` (Kaiming-uniform with `a = √5`),
    /// `B = 0`, stored as effective factors for `alpha`, so a device of rank `rank` receives
    /// exactly the drawn `A`.
    pub fn init_lora(dims: ModelDims, rank: u32, alpha: f32, rng: &mut impl Rng) -> GlobalAdapter {
        let mut g = GlobalAdapter::zeros(dims, rank);
        let sqrt_s = (alpha as f64 / rank.max(1) as f64).sqrt();
        for layer in &mut g.layers {
            let (_, inp) = dims.full_shape(layer.proj);
            let bound = 1.0 / (inp as f64).sqrt();
            for x in &mut layer.a {
                *x = (rng.random_range(-bound..bound) * sqrt_s) as f32;
            }
        }
        g
    }

    /// The layer `(block, proj)`. Panics if `block` is outside the model.
    pub fn layer(&self, block: u32, proj: Proj) -> &GlobalLayer {
        &self.layers[layer_slot(block, proj)]
    }

    /// The dense delta `b @ a` of a layer, `[out_full, in_full]` row-major. Panics if `block` is
    /// outside the model or the adapter is not well formed.
    pub fn delta(&self, block: u32, proj: Proj) -> Vec<f32> {
        let l = self.layer(block, proj);
        let (out, inp) = self.dims.full_shape(proj);
        let r = self.rank as usize;
        let mut d = vec![0.0f32; out * inp];
        for o in 0..out {
            for i in 0..r {
                let bo = l.b[o * r + i];
                if bo != 0.0 {
                    let row = &mut d[o * inp..(o + 1) * inp];
                    for (x, &av) in row.iter_mut().zip(&l.a[i * inp..(i + 1) * inp]) {
                        *x += bo * av;
                    }
                }
            }
        }
        d
    }

    /// The same adapter at another rank: truncated, or zero-padded.
    pub fn with_rank(&self, rank: u32) -> GlobalAdapter {
        if rank == self.rank {
            return self.clone();
        }
        let (r0, r1) = (self.rank as usize, rank as usize);
        let keep = r0.min(r1);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (out, inp) = self.dims.full_shape(l.proj);
                let mut a = vec![0.0; r1 * inp];
                a[..keep * inp].copy_from_slice(&l.a[..keep * inp]);
                let mut b = vec![0.0; out * r1];
                for o in 0..out {
                    b[o * r1..o * r1 + keep].copy_from_slice(&l.b[o * r0..o * r0 + keep]);
                }
                GlobalLayer {
                    block: l.block,
                    proj: l.proj,
                    a,
                    b,
                }
            })
            .collect();
        GlobalAdapter {
            dims: self.dims,
            rank,
            layers,
        }
    }

    /// Checks that the adapter's layers and buffers match its dimensions and rank (for state
    /// restored from disk).
    pub fn is_well_formed(&self) -> bool {
        let r = self.rank as usize;
        self.dims.is_consistent()
            && self.layers.len() == self.dims.n_layers()
            && self.layers.iter().enumerate().all(|(slot, l)| {
                let (out, inp) = self.dims.full_shape(l.proj);
                (l.block, l.proj) == slot_layer(slot)
                    && l.a.len() == r * inp
                    && l.b.len() == out * r
            })
    }

    /// Cuts the adapter for a device: its kept indices, its `rank` (truncating, or zero-padding
    /// components the global adapter does not have) and its scale `alpha / rank`. Returns the
    /// payload and the number of filled (non-padding) components.
    pub fn slice_for(
        &self,
        kept: &KeptIndices,
        rank: u32,
        alpha: f32,
    ) -> Result<(AdapterPayload, u32), AggregateError> {
        if !self.is_well_formed() {
            return Err(AggregateError::MalformedGlobal);
        }
        validate_kept(&self.dims, kept)?;
        if rank == 0 {
            return Err(ValidationError::Rank {
                rank,
                max: u32::MAX,
            }
            .into());
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(ValidationError::Alpha(alpha).into());
        }
        let r = rank as usize;
        let rg = self.rank as usize;
        let filled = r.min(rg);
        let inv_sqrt_s = (rank as f64 / alpha as f64).sqrt() as f32;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (_, in_full) = self.dims.full_shape(l.proj);
                let map = layer_index_map(&self.dims, l.proj, &kept.blocks[l.block as usize]);
                let (out_k, in_k) = (map.rows.len(), map.cols.len());
                let mut a = vec![0.0f32; r * in_k];
                for i in 0..filled {
                    let src = &l.a[i * in_full..(i + 1) * in_full];
                    for (dst, &c) in a[i * in_k..(i + 1) * in_k].iter_mut().zip(&map.cols) {
                        *dst = src[c as usize] * inv_sqrt_s;
                    }
                }
                let mut b = vec![0.0f32; out_k * r];
                for (ol, &o) in map.rows.iter().enumerate() {
                    let src = &l.b[o as usize * rg..o as usize * rg + filled];
                    for (dst, &v) in b[ol * r..ol * r + filled].iter_mut().zip(src) {
                        *dst = v * inv_sqrt_s;
                    }
                }
                LayerAdapter {
                    block: l.block,
                    proj: l.proj,
                    a: Tensor2::f32(rank, in_k as u32, a),
                    b: Tensor2::f32(out_k as u32, rank, b),
                }
            })
            .collect();
        Ok((
            AdapterPayload {
                rank,
                alpha,
                layers,
            },
            filled as u32,
        ))
    }
}

impl GlobalAdapter {
    /// [`GlobalAdapter::slice_for`] packaged as the [`GlobalSlice`] of a round configuration.
    pub fn global_slice(
        &self,
        kept: &KeptIndices,
        rank: u32,
        alpha: f32,
    ) -> Result<GlobalSlice, AggregateError> {
        let (adapter, filled_rank) = self.slice_for(kept, rank, alpha)?;
        Ok(GlobalSlice {
            adapter,
            kept: kept.clone(),
            filled_rank,
        })
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

/// Validates an update (see [`protocol::validate_adapter`]) against `config` and measures its
/// delta norms; refuses any layer above `max_layer_delta_norm`. Touches no state.
pub fn check_contribution(
    dims: &ModelDims,
    config: &AggregateConfig,
    contribution: &Contribution,
) -> Result<ContributionCheck, AggregateError> {
    let limits = ValidationLimits {
        max_rank: config.max_rank,
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

/// HetLoRA running sums of one layer.
struct MeanLayer {
    a_sum: Vec<f64>,
    /// Holder weight per full input column.
    a_weight: Vec<f64>,
    b_sum: Vec<f64>,
    /// Holder weight per full output row.
    b_weight: Vec<f64>,
}

/// Exact-method running sum of one layer.
struct ExactLayer {
    /// `Σ w_k s_k B_k A_k`, `[out_full, in_full]`.
    sum: Vec<f32>,
    /// Holder weight along the pruned side.
    weight: Vec<f64>,
}

/// A validated update kept for the buffering methods.
struct Buffered {
    adapter: AdapterPayload,
    kept: KeptIndices,
    /// Multiplier on each factor: `sqrt(s * clip_factor)`.
    factor_mult: f64,
}

enum State {
    Mean(Vec<Option<MeanLayer>>),
    Exact(Vec<Option<ExactLayer>>),
    Buffered(Vec<Buffered>),
}

/// One round's aggregation: feed accepted updates with [`Aggregation::add`] as they arrive,
/// then [`Aggregation::finish`] into the next global adapter.
pub struct Aggregation {
    dims: ModelDims,
    config: AggregateConfig,
    state: State,
    accepted: usize,
}

impl Aggregation {
    /// An empty aggregation.
    pub fn new(dims: ModelDims, config: AggregateConfig) -> Result<Aggregation, AggregateError> {
        protocol::validate_dims(&dims)?;
        if config.max_rank == 0 {
            return Err(AggregateError::Config("max_rank must be positive".into()));
        }
        if let Method::TrimmedMean { trim_fraction } = config.method {
            if !(0.0..0.5).contains(&trim_fraction) {
                return Err(AggregateError::Config(format!(
                    "trim_fraction {trim_fraction} is outside [0, 0.5)"
                )));
            }
        }
        if let Some(c) = config.clip_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(AggregateError::Config(format!(
                    "clip_norm {c} is not a positive finite number"
                )));
            }
        }
        let n = dims.n_layers();
        let state = match config.method {
            Method::HetLora | Method::Mean => State::Mean((0..n).map(|_| None).collect()),
            Method::Exact => State::Exact((0..n).map(|_| None).collect()),
            Method::Median | Method::TrimmedMean { .. } => State::Buffered(Vec::new()),
        };
        Ok(Aggregation {
            dims,
            config,
            state,
            accepted: 0,
        })
    }

    /// Number of updates accepted so far.
    pub fn len(&self) -> usize {
        self.accepted
    }

    /// Whether no update was accepted yet.
    pub fn is_empty(&self) -> bool {
        self.accepted == 0
    }

    /// The configuration.
    pub fn config(&self) -> &AggregateConfig {
        &self.config
    }

    /// Bytes held by the accumulators (buffered updates included).
    pub fn state_bytes(&self) -> usize {
        match &self.state {
            State::Mean(layers) => layers
                .iter()
                .flatten()
                .map(|l| 8 * (l.a_sum.len() + l.a_weight.len() + l.b_sum.len() + l.b_weight.len()))
                .sum(),
            State::Exact(layers) => layers
                .iter()
                .flatten()
                .map(|l| 4 * l.sum.len() + 8 * l.weight.len())
                .sum(),
            State::Buffered(v) => v.iter().map(|b| b.adapter.byte_len()).sum(),
        }
    }

    /// Validates `contribution` and, only if it is acceptable, folds it into the state.
    pub fn add(&mut self, contribution: Contribution) -> Result<Accepted, AggregateError> {
        let check = check_contribution(&self.dims, &self.config, &contribution)?;
        let clip_factor = match self.config.clip_norm {
            Some(limit) if check.delta_norm > limit => limit / check.delta_norm,
            _ => 1.0,
        };
        let sample_weight = if self.config.weight_by_samples {
            contribution.samples.max(1) as f64
        } else {
            1.0
        };
        let scale = contribution.adapter.scale();
        let dims = self.dims;
        let max_rank = self.config.max_rank as usize;
        let plain_mean = self.config.method == Method::Mean;
        match &mut self.state {
            State::Mean(layers) => {
                let mult = (scale * clip_factor).sqrt();
                for (layer, norm) in contribution
                    .adapter
                    .layers
                    .iter()
                    .zip(&check.layer_delta_norms)
                {
                    let weight = if plain_mean {
                        sample_weight
                    } else {
                        (norm * clip_factor + NORM_FLOOR) * sample_weight
                    };
                    let (out_full, in_full) = dims.full_shape(layer.proj);
                    let acc =
                        layers[layer_slot(layer.block, layer.proj)].get_or_insert_with(|| {
                            MeanLayer {
                                a_sum: vec![0.0; max_rank * in_full],
                                a_weight: vec![0.0; in_full],
                                b_sum: vec![0.0; out_full * max_rank],
                                b_weight: vec![0.0; out_full],
                            }
                        });
                    add_mean_layer(
                        &dims,
                        acc,
                        layer,
                        &contribution.kept,
                        weight * mult,
                        weight,
                        max_rank,
                    );
                }
            }
            State::Exact(layers) => {
                let mult = (scale * clip_factor * sample_weight) as f32;
                for layer in &contribution.adapter.layers {
                    let (out_full, in_full) = dims.full_shape(layer.proj);
                    let side = match layer.proj.pruned_side() {
                        Side::Rows => out_full,
                        Side::Cols => in_full,
                    };
                    let acc =
                        layers[layer_slot(layer.block, layer.proj)].get_or_insert_with(|| {
                            ExactLayer {
                                sum: vec![0.0; out_full * in_full],
                                weight: vec![0.0; side],
                            }
                        });
                    add_exact_layer(&dims, acc, layer, &contribution.kept, mult, sample_weight);
                }
            }
            State::Buffered(v) => v.push(Buffered {
                factor_mult: (scale * clip_factor).sqrt(),
                adapter: contribution.adapter,
                kept: contribution.kept,
            }),
        }
        self.accepted += 1;
        tracing::debug!(
            device = %contribution.device,
            delta_norm = check.delta_norm,
            clip_factor,
            method = self.config.method.name(),
            "update aggregated"
        );
        Ok(Accepted {
            delta_norm: check.delta_norm,
            clip_factor,
        })
    }

    /// The next global adapter at `max_rank`. Coordinates no accepted update held keep their
    /// value in `previous` (zero without one).
    pub fn finish(self, previous: Option<&GlobalAdapter>) -> Result<GlobalAdapter, AggregateError> {
        let dims = self.dims;
        let rank = self.config.max_rank;
        let prev: Option<Cow<'_, GlobalAdapter>> = match previous {
            Some(p) if p.dims != dims => {
                return Err(AggregateError::DimsMismatch {
                    expected: dims,
                    got: p.dims,
                })
            }
            Some(p) if !p.is_well_formed() => return Err(AggregateError::MalformedGlobal),
            Some(p) if p.rank == rank => Some(Cow::Borrowed(p)),
            Some(p) => Some(Cow::Owned(p.with_rank(rank))),
            None => None,
        };
        let prev_layer = |slot: usize| prev.as_ref().map(|p| &p.layers[slot]);
        let mut layers = Vec::with_capacity(dims.n_layers());
        match self.state {
            State::Mean(accs) => {
                for (slot, acc) in accs.into_iter().enumerate() {
                    layers.push(finish_mean_layer(&dims, slot, acc, prev_layer(slot), rank));
                }
            }
            State::Exact(accs) => {
                for (slot, acc) in accs.into_iter().enumerate() {
                    layers.push(finish_exact_layer(
                        &dims,
                        slot,
                        acc,
                        prev_layer(slot),
                        rank,
                        self.config.svd,
                    )?);
                }
            }
            State::Buffered(updates) => {
                for slot in 0..dims.n_layers() {
                    layers.push(finish_robust_layer(
                        &dims,
                        slot,
                        &updates,
                        prev_layer(slot),
                        rank,
                        self.config.method,
                    ));
                }
            }
        }
        Ok(GlobalAdapter { dims, rank, layers })
    }
}

fn add_mean_layer(
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

fn add_exact_layer(
    dims: &ModelDims,
    acc: &mut ExactLayer,
    layer: &LayerAdapter,
    kept: &KeptIndices,
    product_mult: f32,
    weight: f64,
) {
    let map = layer_index_map(dims, layer.proj, &kept.blocks[layer.block as usize]);
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

fn zero_layer(dims: &ModelDims, slot: usize, rank: u32) -> GlobalLayer {
    let (block, proj) = slot_layer(slot);
    let (out, inp) = dims.full_shape(proj);
    GlobalLayer {
        block,
        proj,
        a: vec![0.0; rank as usize * inp],
        b: vec![0.0; out * rank as usize],
    }
}

fn finish_mean_layer(
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

fn finish_exact_layer(
    dims: &ModelDims,
    slot: usize,
    acc: Option<ExactLayer>,
    prev: Option<&GlobalLayer>,
    rank: u32,
    svd_mode: SvdMode,
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
        top_singular(dense, r, svd_mode, slot as u64).map_err(|e| AggregateError::Svd {
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
    mode: SvdMode,
    seed: u64,
) -> Result<Triplets, faer::linalg::svd::SvdError> {
    let min_dim = m.nrows().min(m.ncols());
    let k = r.min(min_dim);
    let probes = match mode {
        SvdMode::Randomized { oversample, .. } => (r + oversample as usize).min(min_dim),
        SvdMode::Full => min_dim,
    };
    if let (SvdMode::Randomized { power_iters, .. }, true) = (mode, probes < min_dim) {
        let mut rng = ChaCha8Rng::seed_from_u64(0x005E_ED0F_5EED ^ seed);
        let omega = Mat::<f64>::from_fn(m.ncols(), probes, |_, _| rng.random_range(-1.0..1.0));
        let mut q = (m.as_ref() * omega.as_ref()).qr().compute_thin_Q();
        for _ in 0..power_iters {
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

/// The robust statistic of `values` (non-empty): median or trimmed mean.
fn robust_stat(values: &mut [f32], method: Method) -> f32 {
    let n = values.len();
    match method {
        Method::TrimmedMean { trim_fraction } => {
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

fn finish_robust_layer(
    dims: &ModelDims,
    slot: usize,
    updates: &[Buffered],
    prev: Option<&GlobalLayer>,
    rank: u32,
    method: Method,
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
            out_layer.a[i * in_full + j] = robust_stat(&mut scratch, method);
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
            out_layer.b[o * r + i] = robust_stat(&mut scratch, method);
        }
    }
    out_layer
}
