//! `AggregationConfig`: plain data (serde, TOML `[aggregation]`) saying how a round's updates
//! are combined: the method, the SVD of the exact method, clipping, norm screening and the
//! refusal limits.
//!
//! The same type is the `[aggregation]` table of the coordinator's config and the settings an
//! [`crate::aggregate::Aggregation`] runs with; the global rank (`max_rank`) is the run's, passed
//! next to it.

use serde::{Deserialize, Serialize};

/// How updates are combined (every strategy uses the configured method unless its own config
/// names one: `hetlora` and `fedlora` take an `aggregation` override).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationMethod {
    /// Weight-delta averaging re-factored by SVD (FlexLoRA-style).
    Exact,
    /// Zero-pad, norm-weighted average of the factors, truncation per device.
    #[serde(rename = "hetlora")]
    HetLora,
    /// Plain (FedAvg) average of the factors, weighted by sample count when configured: the
    /// `fedlora` baseline. With equal ranks and no pruning it is FedAvg on `A` and `B`.
    Mean,
    /// Coordinate-wise median of the factors.
    Median,
    /// Coordinate-wise mean after dropping `trim_fraction` of the values at each end.
    TrimmedMean,
}

impl AggregationMethod {
    /// Short name for reports (the same as in TOML).
    pub fn name(&self) -> &'static str {
        match self {
            AggregationMethod::HetLora => "hetlora",
            AggregationMethod::Mean => "mean",
            AggregationMethod::Exact => "exact",
            AggregationMethod::Median => "median",
            AggregationMethod::TrimmedMean => "trimmed-mean",
        }
    }
}

/// How [`AggregationMethod::Exact`] re-factors the aggregated delta of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SvdMode {
    /// faer's thin SVD: the exact top `max_rank` singular triplets.
    Full,
    /// Randomised subspace iteration (Halko, Martinsson and Tropp, 2011): `max_rank +
    /// svd_oversample` seeded random probes, `svd_power_iters` power iterations with
    /// re-orthonormalisation, then an exact SVD of the small projected matrix. Exact when the
    /// delta's rank is at most `max_rank + svd_oversample`, close to the optimal truncation
    /// otherwise, and an order of magnitude faster than `Full` on large layers. Deterministic
    /// (probes seeded per layer).
    Randomized,
}

/// Aggregation settings. Every field has a default, so a TOML table names only what it
/// changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// Default `exact`.
    pub method: AggregationMethod,
    /// For `trimmed-mean`: the fraction dropped at each end. Default `0.1`.
    pub trim_fraction: f64,
    /// Scale an update down so that its total delta norm `sqrt(Σ_layers |s B A|_F²)` is at most
    /// this. Default: no clipping.
    pub clip_norm: Option<f64>,
    /// Norm screening: when the round closes, leave out every update whose total delta norm
    /// exceeds this multiple of the median total delta norm of the round's accepted updates (a
    /// scaled or noise update stands out against its cohort however the honest norms grow over
    /// the rounds). Must be above 1. Every method buffers the round's updates until it closes
    /// when this is set. Default: no screening.
    pub screen_factor: Option<f64>,
    /// Refuse an update with a layer whose `|s B A|_F` exceeds this. Default `1000`.
    pub max_layer_delta_norm: f64,
    /// Refuse an update with a factor whose Frobenius norm exceeds this. Default `10000`.
    pub max_factor_norm: f64,
    /// Weight each update by its sample count. Default `true`.
    pub weight_by_samples: bool,
    /// Re-factoring of the exact method. Default `randomized` (about 9x faster than `full` on
    /// SmolLM2 layers, exact when the delta's rank is at most `max_rank + svd_oversample`).
    pub svd: SvdMode,
    /// Extra random probes of `randomized` SVD. Default 8.
    pub svd_oversample: u32,
    /// Power iterations of `randomized` SVD. Default 2.
    pub svd_power_iters: u32,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            method: AggregationMethod::Exact,
            trim_fraction: 0.1,
            clip_norm: None,
            screen_factor: None,
            max_layer_delta_norm: 1.0e3,
            max_factor_norm: 1.0e4,
            weight_by_samples: true,
            svd: SvdMode::Randomized,
            svd_oversample: 8,
            svd_power_iters: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of the `[aggregation]` table, as config files write it.
    #[test]
    fn the_toml_table_keeps_its_names() {
        let c: AggregationConfig = toml::from_str(
            r#"
            method = "trimmed-mean"
            trim_fraction = 0.2
            clip_norm = 5.0
            screen_factor = 3.0
            max_layer_delta_norm = 100.0
            max_factor_norm = 200.0
            weight_by_samples = false
            svd = "full"
            svd_oversample = 4
            svd_power_iters = 1
            "#,
        )
        .unwrap();
        assert_eq!(
            c,
            AggregationConfig {
                method: AggregationMethod::TrimmedMean,
                trim_fraction: 0.2,
                clip_norm: Some(5.0),
                screen_factor: Some(3.0),
                max_layer_delta_norm: 100.0,
                max_factor_norm: 200.0,
                weight_by_samples: false,
                svd: SvdMode::Full,
                svd_oversample: 4,
                svd_power_iters: 1,
            }
        );
        for name in ["exact", "hetlora", "mean", "median", "trimmed-mean"] {
            let c: AggregationConfig = toml::from_str(&format!("method = \"{name}\"")).unwrap();
            assert_eq!(c.method.name(), name);
        }
        let randomized: AggregationConfig = toml::from_str("svd = \"randomized\"").unwrap();
        assert_eq!(randomized, AggregationConfig::default());
        assert!(toml::from_str::<AggregationConfig>("method = \"het-lora\"").is_err());
        assert!(toml::from_str::<AggregationConfig>("rank = 4").is_err());
    }
}
