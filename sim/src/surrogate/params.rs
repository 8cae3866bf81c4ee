//! The surrogate's parameters as a TOML file: the loss-response values, where they came from
//! ([`Provenance`]: command, input files with their SHA-256, date, device-rounds, workload) and
//! how well they predict held-out device-rounds ([`Validation`]). A file without provenance is
//! hand-set, and surrogate runs refuse it unless forced.

use serde::{Deserialize, Serialize};

use crate::config::SurrogateConfig;
use crate::device_rounds::InputFile;
use crate::error::SimError;
use crate::local_data::WorkloadKind;

/// The fitted loss-response model (see the parent module's docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurrogateParams {
    /// What the parameters were fitted from, in words.
    pub source: String,
    pub loss_initial: f64,
    pub loss_floor: f64,
    pub local_rate: f64,
    pub rank_half: f64,
    pub sparsity_penalty: f64,
    pub carry: f64,
    pub device_sd: f64,
    pub noise_sd: f64,
    pub accuracy_intercept: f64,
    pub accuracy_slope: f64,
    pub norm_per_gain: f64,
    /// LM workload: report perplexity `exp(loss)`.
    pub perplexity: bool,
    /// How the parameters were made; absent for hand-set values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Prediction error on held-out device-rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
}

/// Where fitted parameters came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The command line that fitted them.
    pub command: String,
    /// UTC date and time of the fit (RFC 3339).
    pub date: String,
    /// The workload of the device-rounds (`spam`, `sotu`, ...).
    pub workload: String,
    /// Device-rounds the final parameters were fitted on.
    pub device_rounds: u64,
    pub inputs: Vec<InputFile>,
}

/// Prediction error on held-out device-rounds (a seeded split), beside the naive baseline that
/// predicts the training set's mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    pub split_seed: u64,
    pub holdout_fraction: f64,
    pub train_device_rounds: u64,
    pub holdout_device_rounds: u64,
    /// Mean absolute error of the loss change `loss_after - loss_before` (nats).
    pub loss_change_mae: f64,
    pub loss_change_mae_baseline: f64,
    /// Mean absolute error of the held-out accuracy after the round.
    pub accuracy_mae: f64,
    pub accuracy_mae_baseline: f64,
}

/// The built-in parameters, one file per workload, each fitted to device-rounds recorded on it
/// (`sim record` + `sim fit-surrogate`; the files state their provenance): spam classification
/// (also used for the synthetic workload, which has no fit of its own) and State of the Union
/// language modelling.
pub const BUILTIN_SPAM: &str = include_str!("../../configs/surrogate-params-spam.toml");
pub const BUILTIN_SOTU: &str = include_str!("../../configs/surrogate-params-sotu.toml");

impl SurrogateParams {
    /// Parse and check a parameter file (provenance not required; see [`Self::load`]).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, SimError> {
        let p: SurrogateParams =
            toml::from_str(text).map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        p.validate()
            .map_err(|e| SimError::Config(format!("{origin}: {e}")))?;
        Ok(p)
    }

    /// The parameters a surrogate run uses: when `cfg.params` is empty, the built-in fit for
    /// `workload` (SOTU's for `sotu`, spam's otherwise), else that file. Parameters without
    /// provenance are refused unless `cfg.force_unfitted`.
    pub fn load(cfg: &SurrogateConfig, workload: WorkloadKind) -> Result<Self, SimError> {
        let (p, origin) = if cfg.params.is_empty() {
            let (text, file) = match workload {
                WorkloadKind::Sotu => (BUILTIN_SOTU, "surrogate-params-sotu.toml"),
                _ => (BUILTIN_SPAM, "surrogate-params-spam.toml"),
            };
            let origin = format!("built-in surrogate parameters (sim/configs/{file})");
            (Self::from_toml(text, &origin)?, origin)
        } else {
            let text =
                std::fs::read_to_string(&cfg.params).map_err(|e| SimError::io(&cfg.params, e))?;
            (Self::from_toml(&text, &cfg.params)?, cfg.params.clone())
        };
        if p.provenance.is_none() && !cfg.force_unfitted {
            return Err(SimError::Config(format!(
                "{origin}: the surrogate parameters have no provenance (hand-set, not written by \
                 `sim fit-surrogate`); fit them from recorded device-rounds (`sim record`, then \
                 `sim fit-surrogate`) or pass --force-unfitted"
            )));
        }
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), String> {
        let all = [
            self.loss_initial,
            self.loss_floor,
            self.local_rate,
            self.rank_half,
            self.sparsity_penalty,
            self.carry,
            self.device_sd,
            self.noise_sd,
            self.accuracy_intercept,
            self.accuracy_slope,
            self.norm_per_gain,
        ];
        if all.iter().any(|x| !x.is_finite()) {
            return Err("every parameter must be finite".into());
        }
        if !(self.loss_floor >= 0.0 && self.loss_initial > self.loss_floor) {
            return Err(format!(
                "need 0 <= loss_floor ({}) < loss_initial ({})",
                self.loss_floor, self.loss_initial
            ));
        }
        if self.local_rate <= 0.0
            || self.rank_half < 0.0
            || self.device_sd < 0.0
            || self.noise_sd < 0.0
            || self.norm_per_gain < 0.0
        {
            return Err(
                "local_rate must be positive; rank_half, device_sd, noise_sd, norm_per_gain >= 0"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.carry) {
            return Err(format!("carry {} must be in [0, 1]", self.carry));
        }
        Ok(())
    }

    /// Share of the gap one local round closes.
    pub fn phi(&self, rank: f64, steps: f64) -> f64 {
        1.0 - (-self.local_rate * steps * rank / (rank + self.rank_half)).exp()
    }

    pub fn accuracy(&self, loss: f64) -> f64 {
        (self.accuracy_intercept + self.accuracy_slope * loss).clamp(0.0, 1.0)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// One line for reports: where the parameters came from and their validation error.
    pub fn note(&self) -> String {
        let source = match &self.provenance {
            Some(p) => format!(
                "fitted {} from {} {} device-rounds ({} file(s))",
                p.date,
                p.device_rounds,
                p.workload,
                p.inputs.len()
            ),
            None => format!("UNFITTED (forced): {}", self.source),
        };
        match &self.validation {
            Some(v) => format!(
                "{source}; held-out ({} device-rounds) mean absolute error: loss change {:.4} \
                 (mean baseline {:.4}), accuracy {:.4} (mean baseline {:.4})",
                v.holdout_device_rounds,
                v.loss_change_mae,
                v.loss_change_mae_baseline,
                v.accuracy_mae,
                v.accuracy_mae_baseline
            ),
            None => format!("{source}; no validation"),
        }
    }
}
