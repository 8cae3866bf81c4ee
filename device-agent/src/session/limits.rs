//! What a device accepts from an aggregator: caps on a round configuration and the run's LoRA
//! alpha, checked before anything is sized or allocated for them.

use protocol::RoundConfig;

/// Caps on what an aggregator may ask of a device: a round configuration (or the Welcome's
/// LoRA alpha) over any of them is refused with a `RoundFailed` that names the value and the
/// cap, before anything is sized or allocated for it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLimits {
    /// Largest LoRA rank (of the arm and of a global slice).
    pub max_rank: u32,
    /// Largest batch, in sequences.
    pub max_batch: u32,
    /// Most local optimiser steps in one round.
    pub max_local_steps: u32,
    /// Largest learning rate; it must also be finite and positive.
    pub max_learning_rate: f64,
    /// Largest LoRA alpha (the Welcome's and a global slice's); finite and positive too.
    pub max_alpha: f64,
}

impl Default for RoundLimits {
    fn default() -> Self {
        RoundLimits {
            max_rank: 256,
            max_batch: 64,
            max_local_steps: 10_000,
            max_learning_rate: 1.0,
            max_alpha: 1e4,
        }
    }
}

impl RoundLimits {
    /// Why `rc` (with the run's LoRA `alpha`) is refused, or `Ok` when it is within the caps.
    pub fn check(&self, rc: &RoundConfig, alpha: f64) -> Result<(), String> {
        rc.sparsity_goal().check()?;
        if let Some(rp) = &rc.options.rank_pruning {
            rp.check()?;
        }
        let within = |what: &str, v: u64, max: u64| {
            if v == 0 || v > max {
                Err(format!("{what} {v} is not in [1, {max}]"))
            } else {
                Ok(())
            }
        };
        within("rank", rc.arm.rank.into(), self.max_rank.into())?;
        within("batch size", rc.batch_size.into(), self.max_batch.into())?;
        within(
            "local steps",
            rc.local_steps.into(),
            self.max_local_steps.into(),
        )?;
        let positive = |what: &str, v: f64, max: f64| {
            if v.is_finite() && v > 0.0 && v <= max {
                Ok(())
            } else {
                Err(format!("{what} {v} is not a finite value in (0, {max}]"))
            }
        };
        positive(
            "learning rate",
            rc.learning_rate as f64,
            self.max_learning_rate,
        )?;
        positive("LoRA alpha", alpha, self.max_alpha)?;
        if let Some(g) = &rc.global {
            within(
                "global slice rank",
                g.adapter.rank.into(),
                self.max_rank.into(),
            )?;
            positive(
                "global slice LoRA alpha",
                g.adapter.alpha as f64,
                self.max_alpha,
            )?;
        }
        Ok(())
    }
}
