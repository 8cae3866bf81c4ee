//! Gaussian Thompson sampling over an `ArmGrid`.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grid::{argmax_random_tie, exploit_best_mean, ArmStats};
use super::{check_range, check_reward, ArmGrid, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;
use crate::sampling::standard_normal;

/// Parameters of [`Thompson`]: a Normal prior on each arm's mean reward and a known reward
/// noise level.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThompsonConfig {
    /// Ratios in the grid. Default `6`.
    pub n_ratios: usize,
    /// Prior mean of every arm's reward. Default `0.5` (middle of [0, 1]).
    pub prior_mean: f64,
    /// Prior standard deviation. Default `0.5`.
    pub prior_std: f64,
    /// Assumed standard deviation of one reward around its arm's mean. Default `0.2`.
    pub noise_std: f64,
}

impl Default for ThompsonConfig {
    fn default() -> Self {
        ThompsonConfig {
            n_ratios: 6,
            prior_mean: 0.5,
            prior_std: 0.5,
            noise_std: 0.2,
        }
    }
}

/// Thompson sampling with a conjugate Normal model: each arm's posterior is
/// `N(m, v)` with `1/v = 1/prior_std^2 + n/noise_std^2` and
/// `m = v * (prior_mean/prior_std^2 + sum/noise_std^2)`; the arm with the largest draw plays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thompson {
    config: ThompsonConfig,
    grid: ArmGrid,
    stats: Vec<ArmStats>,
}

impl Thompson {
    pub fn new(space: ArmSpace, config: ThompsonConfig) -> Result<Self, BanditError> {
        check_range(
            "prior_mean",
            config.prior_mean,
            f64::MIN,
            f64::MAX,
            "a finite number",
        )?;
        check_range(
            "prior_std",
            config.prior_std,
            f64::MIN_POSITIVE,
            f64::MAX,
            "a finite number > 0",
        )?;
        check_range(
            "noise_std",
            config.noise_std,
            f64::MIN_POSITIVE,
            f64::MAX,
            "a finite number > 0",
        )?;
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(Thompson {
            config,
            stats: vec![ArmStats::default(); grid.len()],
            grid,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }

    /// Posterior mean and standard deviation of grid arm `i`.
    fn posterior(&self, i: usize) -> (f64, f64) {
        let c = &self.config;
        let prior_prec = 1.0 / (c.prior_std * c.prior_std);
        let noise_prec = 1.0 / (c.noise_std * c.noise_std);
        let s = self.stats[i];
        let prec = prior_prec + s.count as f64 * noise_prec;
        let mean = (c.prior_mean * prior_prec + s.sum * noise_prec) / prec;
        (mean, prec.recip().sqrt())
    }
}

impl Policy for Thompson {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let feasible = self.grid.feasible(region);
        let mut draws = Vec::with_capacity(feasible.len());
        for &i in &feasible {
            let (m, sd) = self.posterior(i);
            draws.push((i, m + sd * standard_normal(rng)));
        }
        let i = argmax_random_tie(draws, rng).ok_or(BanditError::NoFeasibleArm {
            device_id: ctx.device_id,
        })?;
        Ok(self.grid.arm(i))
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        let i = self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        self.stats[i].count += 1;
        self.stats[i].sum += reward;
        Ok(())
    }

    exploit_best_mean!();
}
