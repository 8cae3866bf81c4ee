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
//! - [`AggregationMethod::HetLora`] (`mean.rs`): zero-pad to `max_rank`, average `Ã` and `B̃`
//!   with per-layer weights `w_k ∝ |B̃_k Ã_k|_F` (times the sample count when
//!   `weight_by_samples`), normalised over the holders of each coordinate; each device later
//!   receives the truncation to its rank. Streaming: running sums of size
//!   `max_rank x (in + out)` per layer, whatever the device count (without norm screening).
//! - [`AggregationMethod::Mean`] (`mean.rs`): the same zero-padded running sums with weights
//!   `w_k` = sample count (or 1): FedAvg of the factors, the `fedlora` baseline.
//! - [`AggregationMethod::Exact`] (`exact.rs`, FlexLoRA-style): `dW = Σ w_k s_k B_k A_k` per
//!   layer in full coordinates (`w_k` = sample count, or 1), normalised over holders, then a
//!   thin SVD (faer, `f64`) re-factors it at `max_rank`: `B̃ = U_r sqrt(S_r)`,
//!   `Ã = sqrt(S_r) V_rᵀ`, the square root of the singular values split evenly between the
//!   factors. Since singular triplets are ordered, truncating to a device's rank is the best
//!   rank-`r_k` approximation ([`SvdMode::Randomized`] trades exactness for speed on large
//!   layers). faer runs sequentially, so results do not depend on thread scheduling.
//!   Streaming: one dense `f32` `[out, in]` running sum per layer (about 425 MB for
//!   SmolLM2-135M), whatever the device count (without norm screening).
//! - [`AggregationMethod::Median`], [`AggregationMethod::TrimmedMean`] (`robust.rs`):
//!   coordinate-wise over the holders of each coordinate of the zero-padded effective factors
//!   (unweighted). These must buffer every update until [`Aggregation::finish`].
//!
//! Every update is validated ([`protocol::validate_adapter`]: shapes, finiteness, factor norms)
//! and its per-layer delta norms `|s B A|_F` checked against `max_layer_delta_norm` *before* it
//! touches any accumulator. Optional norm clipping scales an update whose total delta norm
//! exceeds `clip_norm` down to it. Optional norm screening (`screen_factor`) holds the round's
//! accepted updates until [`Aggregation::screen`] (called by [`Aggregation::finish`] if nobody
//! did) leaves out those whose total delta norm exceeds `screen_factor` times the round's median
//! and feeds the rest to the method in arrival order, so with no outlier the result is the one
//! without screening, bit for bit. Holding costs every method the round's update bytes until it
//! closes, as the buffering methods always do (one update per selected device).
//!
//! # Where things are
//! `config.rs` holds the settings ([`AggregationConfig`]), `error.rs` the error,
//! `global.rs` the [`GlobalAdapter`] and the slice a device receives, `contribution.rs` an
//! update's validation and delta norms, `mean.rs`, `exact.rs` and `robust.rs` one method
//! family each (clipping and the screening limit are in `robust.rs`); this file is the round's
//! [`Aggregation`] that feeds each accepted update to its method and finishes into the next
//! global adapter.

mod config;
mod contribution;
mod error;
mod exact;
mod global;
mod mean;
mod robust;

use std::borrow::Cow;

use protocol::{DeviceId, LayerIndexMap, ModelDims, Side};

pub use config::{AggregationConfig, AggregationMethod, SvdMode};
pub use contribution::{
    check_contribution, delta_norm, layer_delta_norm, Accepted, Contribution, ContributionCheck,
};
pub use error::AggregateError;
pub use global::{GlobalAdapter, GlobalLayer};

use exact::ExactLayer;
use global::layer_slot;
use mean::MeanLayer;
use robust::Buffered;
pub use robust::SCREEN_MIN_UPDATES;

/// What a round's aggregation holds until it finishes, by method.
enum State {
    /// HetLoRA and plain mean: running sums per layer ([`mean`]).
    Mean(Vec<Option<MeanLayer>>),
    /// Exact: a dense delta sum per layer ([`exact`]).
    Exact(Vec<Option<ExactLayer>>),
    /// Median and trimmed mean: every accepted update ([`robust`]).
    Buffered(Vec<Buffered>),
}

/// One round's aggregation: feed accepted updates with [`Aggregation::add`] as they arrive,
/// then [`Aggregation::finish`] into the next global adapter.
pub struct Aggregation {
    dims: ModelDims,
    /// Rank of the global adapter; updates of a higher rank are refused.
    max_rank: u32,
    config: AggregationConfig,
    state: State,
    accepted: usize,
    /// With `screen_factor`: the accepted updates not yet screened, in arrival order.
    pending: Vec<Held>,
    /// Whether an update came through [`Aggregation::add_against`] with a starting global: the
    /// HetLoRA and mean layers' steps are then bounded (see `mean.rs`).
    anchored: bool,
    /// Layers [`Aggregation::finish_counting_bounds`] kept at their previous value.
    layers_bounded: u32,
    /// Folded update layers whose scalar gauge was repaired.
    layers_regauged: u32,
}

/// An accepted update, checked, with its per-layer steps from the slice it started from and the
/// gauges to fold its layers with (HetLoRA and mean, when added against a starting global; see
/// `mean::layer_step`).
struct Held {
    contribution: Contribution,
    check: ContributionCheck,
    steps: Option<Vec<(f64, f64)>>,
}

/// What the averaging methods' gauge defences did in a round (see `mean.rs`; zero for the
/// other methods and without a starting global).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GaugeBounds {
    /// Layers whose step was out of bounds, kept at their previous value.
    pub layers_bounded: u32,
    /// Update layers folded with their scalar gauge repaired.
    pub layers_regauged: u32,
}

/// An update [`Aggregation::screen`] left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Screened {
    pub device: DeviceId,
    /// Its total delta norm.
    pub delta_norm: f64,
    /// The limit it exceeded: `screen_factor` times the median.
    pub limit: f64,
}

impl Aggregation {
    /// An empty aggregation into a global adapter of rank `max_rank`.
    pub fn new(
        dims: ModelDims,
        max_rank: u32,
        config: AggregationConfig,
    ) -> Result<Aggregation, AggregateError> {
        protocol::validate_dims(&dims)?;
        if max_rank == 0 {
            return Err(AggregateError::Config("max_rank must be positive".into()));
        }
        if config.method == AggregationMethod::TrimmedMean {
            let trim_fraction = config.trim_fraction;
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
        if let Some(k) = config.screen_factor {
            if !(k > 1.0 && k.is_finite()) {
                return Err(AggregateError::Config(format!(
                    "screen_factor {k} is not a finite number above 1"
                )));
            }
        }
        let n = dims.n_layers();
        let state = match config.method {
            AggregationMethod::HetLora | AggregationMethod::Mean => {
                State::Mean((0..n).map(|_| None).collect())
            }
            AggregationMethod::Exact => State::Exact((0..n).map(|_| None).collect()),
            AggregationMethod::Median | AggregationMethod::TrimmedMean => {
                State::Buffered(Vec::new())
            }
        };
        Ok(Aggregation {
            dims,
            max_rank,
            config,
            state,
            accepted: 0,
            pending: Vec::new(),
            anchored: false,
            layers_bounded: 0,
            layers_regauged: 0,
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

    /// The settings.
    pub fn config(&self) -> &AggregationConfig {
        &self.config
    }

    /// Rank of the global adapter this aggregation produces.
    pub fn max_rank(&self) -> u32 {
        self.max_rank
    }

    /// Bytes held by the accumulators (buffered updates included).
    pub fn state_bytes(&self) -> usize {
        let pending: usize = self
            .pending
            .iter()
            .map(|h| h.contribution.adapter.byte_len())
            .sum();
        let held: usize = match &self.state {
            State::Mean(layers) => layers.iter().flatten().map(MeanLayer::state_bytes).sum(),
            State::Exact(layers) => layers.iter().flatten().map(ExactLayer::state_bytes).sum(),
            State::Buffered(v) => v.iter().map(|b| b.adapter.byte_len()).sum(),
        };
        pending + held
    }

    /// Validates `contribution` and, only if it is acceptable, folds it into the state (with
    /// norm screening: holds it for [`Aggregation::screen`]).
    pub fn add(&mut self, contribution: Contribution) -> Result<Accepted, AggregateError> {
        self.add_against(contribution, None)
    }

    /// [`Aggregation::add`] for an update that started from its slice of `start`, the global
    /// adapter the round began with (pass the same one to [`Aggregation::finish`]): HetLoRA and
    /// mean then bound each layer's step by the updates' own steps from their slices, which
    /// closes the factors' gauge to an attacker (see `mean.rs`). The coordinator always does.
    pub fn add_against(
        &mut self,
        contribution: Contribution,
        start: Option<&GlobalAdapter>,
    ) -> Result<Accepted, AggregateError> {
        let check = check_contribution(&self.dims, self.max_rank, &self.config, &contribution)?;
        let clip_factor = robust::clip_factor(check.delta_norm, self.config.clip_norm);
        let accepted = Accepted {
            delta_norm: check.delta_norm,
            clip_factor,
        };
        let steps = match (&self.state, start) {
            (State::Mean(_), Some(g)) if g.dims == self.dims && g.is_well_formed() => {
                self.anchored = true;
                let mult = (contribution.adapter.scale() * clip_factor).sqrt();
                let start_rank = g.rank as usize;
                Some(
                    contribution
                        .adapter
                        .layers
                        .iter()
                        .map(|l| {
                            let from = &g.layers[layer_slot(l.block, l.proj)];
                            let kept = &contribution.kept;
                            mean::layer_step(&self.dims, l, kept, mult, from, start_rank)
                        })
                        .collect(),
                )
            }
            _ => None,
        };
        self.accepted += 1;
        let held = Held {
            contribution,
            check,
            steps,
        };
        if self.config.screen_factor.is_some() {
            self.pending.push(held);
        } else {
            self.fold(held);
        }
        Ok(accepted)
    }

    /// Norm screening: leaves out every held update whose total delta norm exceeds
    /// `screen_factor` times the median of the held updates' norms, folds the others into the
    /// state in arrival order and returns what it left out (nothing without `screen_factor`).
    /// The median is the honest one only while attackers are a strict minority of the held
    /// updates; fewer than [`SCREEN_MIN_UPDATES`] are all kept. Updates added after a
    /// call are held for the next one.
    pub fn screen(&mut self) -> Vec<Screened> {
        let Some(factor) = self.config.screen_factor else {
            return Vec::new();
        };
        let pending = std::mem::take(&mut self.pending);
        let norms: Vec<f64> = pending.iter().map(|h| h.check.delta_norm).collect();
        let limit = robust::screen_limit(&norms, factor);
        let mut out = Vec::new();
        for held in pending {
            let (contribution, check) = (&held.contribution, &held.check);
            if check.delta_norm > limit {
                tracing::debug!(device = %contribution.device, delta_norm = check.delta_norm, limit, "update screened out");
                out.push(Screened {
                    device: contribution.device,
                    delta_norm: check.delta_norm,
                    limit,
                });
                self.accepted -= 1;
            } else {
                self.fold(held);
            }
        }
        out
    }

    /// Folds a checked update into the method's state.
    fn fold(&mut self, held: Held) {
        let Held {
            contribution,
            check,
            steps,
        } = held;
        let clip_factor = robust::clip_factor(check.delta_norm, self.config.clip_norm);
        let sample_weight = if self.config.weight_by_samples {
            contribution.samples.max(1) as f64
        } else {
            1.0
        };
        let scale = contribution.adapter.scale();
        let dims = self.dims;
        let max_rank = self.max_rank as usize;
        let plain_mean = self.config.method == AggregationMethod::Mean;
        match &mut self.state {
            State::Mean(layers) => {
                let mult = (scale * clip_factor).sqrt();
                for (i, (layer, norm)) in contribution
                    .adapter
                    .layers
                    .iter()
                    .zip(&check.layer_delta_norms)
                    .enumerate()
                {
                    // Without a starting global the step is measured from zero.
                    let product = norm * clip_factor;
                    let (step, gauge) = steps.as_ref().map_or((product, 1.0), |s| s[i]);
                    if gauge != 1.0 {
                        self.layers_regauged += 1;
                    }
                    let weight = if plain_mean {
                        sample_weight
                    } else {
                        mean::hetlora_weight(*norm, clip_factor, sample_weight)
                    };
                    let (out_full, in_full) = dims.full_shape(layer.proj);
                    let acc = layers[layer_slot(layer.block, layer.proj)]
                        .get_or_insert_with(|| MeanLayer::new(out_full, in_full, max_rank));
                    mean::add_mean_layer(
                        &dims,
                        acc,
                        layer,
                        &contribution.kept,
                        weight * mult,
                        weight,
                        max_rank,
                        gauge,
                        (step, product),
                    );
                }
            }
            State::Exact(layers) => {
                let mult = (scale * clip_factor * sample_weight) as f32;
                // One index map refilled for every layer.
                let mut map = LayerIndexMap::default();
                for layer in &contribution.adapter.layers {
                    let (out_full, in_full) = dims.full_shape(layer.proj);
                    let side = match layer.proj.pruned_side() {
                        Side::Rows => out_full,
                        Side::Cols => in_full,
                    };
                    let acc = layers[layer_slot(layer.block, layer.proj)]
                        .get_or_insert_with(|| ExactLayer::new(out_full, in_full, side));
                    exact::add_exact_layer(
                        &dims,
                        acc,
                        layer,
                        &contribution.kept,
                        mult,
                        sample_weight,
                        &mut map,
                    );
                }
            }
            State::Buffered(v) => v.push(Buffered {
                factor_mult: (scale * clip_factor).sqrt(),
                adapter: contribution.adapter,
                kept: contribution.kept,
            }),
        }
        tracing::debug!(
            device = %contribution.device,
            delta_norm = check.delta_norm,
            clip_factor,
            method = self.config.method.name(),
            "update aggregated"
        );
    }

    /// The next global adapter at `max_rank`, after [`Aggregation::screen`] if nobody called it.
    /// Coordinates no accepted update held keep their value in `previous` (zero without one).
    pub fn finish(self, previous: Option<&GlobalAdapter>) -> Result<GlobalAdapter, AggregateError> {
        self.finish_counting_bounds(previous).map(|(g, _)| g)
    }

    /// [`Aggregation::finish`], with what the gauge defences of HetLoRA and mean (fed through
    /// [`Aggregation::add_against`]) did: see `mean.rs`.
    pub fn finish_counting_bounds(
        mut self,
        previous: Option<&GlobalAdapter>,
    ) -> Result<(GlobalAdapter, GaugeBounds), AggregateError> {
        self.screen();
        let dims = self.dims;
        let rank = self.max_rank;
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
                    let (layer, kept_previous) = mean::finish_mean_layer(
                        &dims,
                        slot,
                        acc,
                        prev_layer(slot),
                        rank,
                        self.anchored,
                    );
                    if kept_previous {
                        let (block, proj) = (layer.block, layer.proj.name());
                        tracing::warn!(
                            block,
                            proj,
                            "averaged layer's step out of bounds; previous value kept"
                        );
                        self.layers_bounded += 1;
                    }
                    layers.push(layer);
                }
            }
            State::Exact(accs) => {
                for (slot, acc) in accs.into_iter().enumerate() {
                    layers.push(exact::finish_exact_layer(
                        &dims,
                        slot,
                        acc,
                        prev_layer(slot),
                        rank,
                        &self.config,
                    )?);
                }
            }
            State::Buffered(updates) => {
                for slot in 0..dims.n_layers() {
                    layers.push(robust::finish_robust_layer(
                        &dims,
                        slot,
                        &updates,
                        prev_layer(slot),
                        rank,
                        &self.config,
                    ));
                }
            }
        }
        let bounds = GaugeBounds {
            layers_bounded: self.layers_bounded,
            layers_regauged: self.layers_regauged,
        };
        Ok((GlobalAdapter { dims, rank, layers }, bounds))
    }
}
