//! Reward shaping: one round's per-device statistics in, one reward in [0, 1] per device out.
//!
//! For device `i` among the devices that finished in time (failed or late devices get 0):
//!
//! ```text
//! loss_i     = (L_pre - L_post) / L_pre, divided by the round's loss scale, clamped to [-1, 1]
//! scale      = max_j |loss_j| over the round            (loss_trim = 0, the default)
//!            = the (f+1)-th largest |loss_j|, f = min(ceil(loss_trim * n), n - 1), n the
//!              devices that finished in time (ceil with a 1e-9 tolerance: 0.1 * 30 is 3)
//! progress_i = (s_t - s_{t-1}) / (s* - s_{t-1}), clamped to [-1, 1]   (1 when s_{t-1} >= s*)
//! norm_i     = |B_i A_i|_F / max_j |B_j A_j|_F
//! late_i     = (T_i - mean_T) / mean_T          (mean over the devices that finished in time)
//! time_i     = late_i                when late_i > 0   (a straggler: full penalty)
//!            = early_credit * late_i otherwise          (an early finisher: a smaller credit)
//! R_i        = clamp((w1*loss_i + w2*progress_i + w3*norm_i - w4*time_i) / (w1 + w2 + w3), 0, 1)
//! ```
//!
//! - **Loss**: dividing by the round's largest loss change is the within-round normalisation:
//!   losses fall less as training converges, and without it every later arm would look worse
//!   than the early ones. The losses are the devices' own reports, which the aggregator can
//!   only range-check: with the round's largest as the scale, one device claiming a perfect
//!   round (`L_post = 0`, a change of 1) or a blow-up (`L_pre` near 0, `L_post` at the
//!   aggregator's `max_loss`, a change of about -1e9) shrinks every other device's loss term
//!   toward 0. `loss_trim > 0` takes the scale from the `(f+1)`-th largest magnitude instead,
//!   so up to `f` devices (a `loss_trim` share of the round, rounded up) cannot set it: the
//!   scale stays one of the other devices' own changes, and the `f` largest terms are clamped
//!   to `[-1, 1]`. At `loss_trim = 0` the clamp never acts (no term exceeds the largest).
//! - **Progress toward s\***: the share of the remaining gap to the run's target sparsity `s*`
//!   that the round closed. It is not divided by the arm's own ratio, so a small non-zero ratio
//!   earns a small share, never full credit; only closing the whole gap earns 1. A device
//!   already at `s*` keeps full credit (there is nothing left to close).
//! - **Update importance**: the norm of the device's LoRA update relative to the round's
//!   largest.
//! - **Completion time** relative to the round's pace (its mean completion time): a straggler
//!   loses `w4` per unit of relative lateness, an early finisher gains only `early_credit * w4`
//!   per unit of earliness (`early_credit < 1`), so finishing late costs more than finishing
//!   early earns.
//!
//! Dividing by `w1 + w2 + w3` makes a device that is best on every positive term and exactly on
//! the mean time score 1. Each ratio with a zero denominator (`L_pre = 0`, all norms 0, mean
//! time 0) contributes 0.

use serde::{Deserialize, Serialize};

use crate::error::BanditError;

/// What one device reported for one round (plus the coordinator's verdict on it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Training loss before the round's local work.
    pub loss_pre: f64,
    /// Training loss after it.
    pub loss_post: f64,
    /// Device sparsity before the round, in [0, 1].
    pub sparsity_prev: f64,
    /// Device sparsity after the round, in [0, 1].
    pub sparsity_now: f64,
    /// The run's target sparsity s* the device is heading for, in [0, 1] (not the arm's ratio:
    /// progress is measured against the common target).
    pub sparsity_target: f64,
    /// Frobenius norm `|B A|_F` of the device's adapter update.
    pub update_norm: f64,
    /// Wall time of the device's round.
    pub duration_ms: u64,
    /// The device failed (crash, out of memory, rejected update): reward 0.
    pub failed: bool,
    /// The device answered after the deadline: reward 0.
    pub missed_deadline: bool,
}

/// Weights of the four reward terms (all `>= 0`, and `w1 + w2 + w3 > 0`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    /// Relative loss reduction. Default `1.0`.
    pub w1: f64,
    /// Sparsity progress toward the target. Default `0.5`.
    pub w2: f64,
    /// Update norm relative to the round's largest. Default `0.25`.
    pub w3: f64,
    /// Penalty per unit of relative lateness against the round's mean duration. Default `0.25`.
    pub w4: f64,
    /// Share of `w4` an early finisher earns per unit of relative earliness, in `[0, 1)`
    /// (stragglers are penalised more than early finishers are rewarded). Default `0.5`.
    pub early_credit: f64,
    /// Share of the round's devices, in `[0, 0.5)`, whose loss changes cannot set the loss
    /// term's scale (see the module docs): `0` (the default) divides by the round's largest
    /// change, as every run before this option did. The bound holds for a round whose liars
    /// number at most `ceil(loss_trim * n)`, `n` being the devices that finished in time that
    /// round (not the fleet): set it at least to the share of a round that may lie, with room
    /// for rounds where fewer honest devices finish. Left out of serialised configs at 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub loss_trim: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights {
            w1: 1.0,
            w2: 0.5,
            w3: 0.25,
            w4: 0.25,
            early_credit: 0.5,
            loss_trim: 0.0,
        }
    }
}

impl RewardWeights {
    pub fn validate(&self) -> Result<(), BanditError> {
        for (name, w) in [
            ("w1", self.w1),
            ("w2", self.w2),
            ("w3", self.w3),
            ("w4", self.w4),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(BanditError::param(name, w, "a finite weight >= 0"));
            }
        }
        if !(self.early_credit.is_finite() && (0.0..1.0).contains(&self.early_credit)) {
            return Err(BanditError::param(
                "early_credit",
                self.early_credit,
                "in [0, 1) (an early finisher earns less than a straggler loses)",
            ));
        }
        if !(self.loss_trim.is_finite() && (0.0..0.5).contains(&self.loss_trim)) {
            return Err(BanditError::param(
                "loss_trim",
                self.loss_trim,
                "in [0, 0.5) (a share of the round that cannot set the loss scale)",
            ));
        }
        let positive = self.w1 + self.w2 + self.w3;
        if positive <= 0.0 {
            return Err(BanditError::param(
                "w1 + w2 + w3",
                positive,
                "a positive sum (some reward term must count)",
            ));
        }
        Ok(())
    }
}

fn check_stat(
    index: usize,
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    expected: &'static str,
) -> Result<(), BanditError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(BanditError::InvalidStat {
            index,
            field,
            value,
            expected,
        })
    }
}

/// Rewards for one round, in the order of `stats` (see the module docs for the formula).
///
/// Failed and late devices get 0 and their other fields are not looked at. For the rest,
/// losses and the update norm must be finite and `>= 0` and sparsities in [0, 1]; anything
/// else is an [`BanditError::InvalidStat`].
pub fn shape_rewards(stats: &[RoundStats], w: &RewardWeights) -> Result<Vec<f64>, BanditError> {
    w.validate()?;
    let counts = |s: &RoundStats| !s.failed && !s.missed_deadline;
    for (i, s) in stats.iter().enumerate().filter(|(_, s)| counts(s)) {
        check_stat(i, "loss_pre", s.loss_pre, 0.0, f64::MAX, "finite and >= 0")?;
        check_stat(
            i,
            "loss_post",
            s.loss_post,
            0.0,
            f64::MAX,
            "finite and >= 0",
        )?;
        check_stat(i, "sparsity_prev", s.sparsity_prev, 0.0, 1.0, "in [0, 1]")?;
        check_stat(i, "sparsity_now", s.sparsity_now, 0.0, 1.0, "in [0, 1]")?;
        check_stat(
            i,
            "sparsity_target",
            s.sparsity_target,
            0.0,
            1.0,
            "in [0, 1]",
        )?;
        check_stat(
            i,
            "update_norm",
            s.update_norm,
            0.0,
            f64::MAX,
            "finite and >= 0",
        )?;
    }
    let valid: Vec<&RoundStats> = stats.iter().filter(|s| counts(s)).collect();
    if valid.is_empty() {
        return Ok(vec![0.0; stats.len()]);
    }

    // Finite losses can still divide to an infinite change (1e300 over 1e-300): such a change
    // counts as the largest finite one, so no reward becomes NaN.
    let loss_change = |s: &RoundStats| {
        if s.loss_pre > 0.0 {
            ((s.loss_pre - s.loss_post) / s.loss_pre).clamp(-f64::MAX, f64::MAX)
        } else {
            0.0
        }
    };
    let loss_scale = loss_scale(valid.iter().map(|s| loss_change(s).abs()), w.loss_trim);
    let max_norm = valid.iter().map(|s| s.update_norm).fold(0.0, f64::max);
    let mean_time = valid.iter().map(|s| s.duration_ms as f64).sum::<f64>() / valid.len() as f64;
    let positive = w.w1 + w.w2 + w.w3;

    Ok(stats
        .iter()
        .map(|s| {
            if !counts(s) {
                return 0.0;
            }
            let loss = if loss_scale > 0.0 {
                (loss_change(s) / loss_scale).clamp(-1.0, 1.0)
            } else {
                0.0
            };
            let progress = progress_toward_target(s);
            let norm = if max_norm > 0.0 {
                s.update_norm / max_norm
            } else {
                0.0
            };
            let late = if mean_time > 0.0 {
                (s.duration_ms as f64 - mean_time) / mean_time
            } else {
                0.0
            };
            let time = if late > 0.0 {
                late
            } else {
                w.early_credit * late
            };
            let raw = w.w1 * loss + w.w2 * progress + w.w3 * norm - w.w4 * time;
            (raw / positive).clamp(0.0, 1.0)
        })
        .collect())
}

/// The loss term's scale from the round's loss-change magnitudes: the largest at `trim = 0`,
/// else the `(f+1)`-th largest with `f = min(ceil(trim * n), n - 1)`.
fn loss_scale(magnitudes: impl Iterator<Item = f64>, trim: f64) -> f64 {
    let mut m: Vec<f64> = magnitudes.collect();
    if m.is_empty() {
        return 0.0;
    }
    // The tolerance keeps a product such as 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    let f = ((trim * m.len() as f64 - 1e-9).ceil().max(0.0) as usize).min(m.len() - 1);
    m.sort_unstable_by(|a, b| b.total_cmp(a));
    m[f]
}

/// The share of the remaining gap to the target sparsity that the round closed, in `[-1, 1]`
/// (1 for a device that started at or past the target: there was nothing left to close).
fn progress_toward_target(s: &RoundStats) -> f64 {
    let gap = s.sparsity_target - s.sparsity_prev;
    if gap <= 0.0 {
        return 1.0;
    }
    ((s.sparsity_now - s.sparsity_prev) / gap).clamp(-1.0, 1.0)
}
