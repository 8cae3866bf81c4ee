//! UCB1, discounted UCB and sliding-window UCB over an `ArmGrid`.
//!
//! All three score a grid arm as `mean + c * sqrt(2 ln n / N)` (unplayed: `+inf`) and play the
//! best feasible one. They differ in what `mean`, `N` and `n` remember: everything (UCB1), an
//! exponentially discounted past (discounted UCB), or the last `window` plays (sliding window).

use std::collections::VecDeque;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grid::{argmax_random_tie, exploit_best_mean, ArmStats};
use super::{check_range, check_reward, ArmGrid, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// `2 ln n`, computed once per choice (`n < 1` counts as 1).
fn log_term(n: f64) -> f64 {
    2.0 * n.max(1.0).ln()
}

fn bonus(exploration: f64, log_term: f64, count: f64) -> f64 {
    exploration * (log_term / count).sqrt()
}

fn no_feasible(ctx: &DeviceContext) -> BanditError {
    BanditError::NoFeasibleArm {
        device_id: ctx.device_id,
    }
}

/// Parameters of [`Ucb1`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ucb1Config {
    /// Ratios in the grid (times every allowed rank). Default `6`.
    pub n_ratios: usize,
    /// Multiplier `c` of the confidence bonus. Default `0.15`, tuned in the arena for rewards
    /// in [0, 1] with noise around 0.1 (`1.0` is textbook UCB1, which over-explores there:
    /// see BENCHMARKS-bandit.md).
    pub exploration: f64,
}

impl Default for Ucb1Config {
    fn default() -> Self {
        Ucb1Config {
            n_ratios: 6,
            exploration: 0.15,
        }
    }
}

/// UCB1 (Auer et al.) on a grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ucb1 {
    config: Ucb1Config,
    grid: ArmGrid,
    stats: Vec<ArmStats>,
    total: u64,
}

impl Ucb1 {
    pub fn new(space: ArmSpace, config: Ucb1Config) -> Result<Self, BanditError> {
        check_range(
            "exploration",
            config.exploration,
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(Ucb1 {
            config,
            stats: vec![ArmStats::default(); grid.len()],
            grid,
            total: 0,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }

    pub fn config(&self) -> &Ucb1Config {
        &self.config
    }
}

impl Policy for Ucb1 {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let log_n = log_term(self.total as f64);
        let scored = self.grid.feasible_iter(region).map(|i| {
            let s = self.stats[i];
            let score = if s.count == 0 {
                f64::INFINITY
            } else {
                s.mean() + bonus(self.config.exploration, log_n, s.count as f64)
            };
            (i, score)
        });
        let i = argmax_random_tie(scored, rng).ok_or_else(|| no_feasible(ctx))?;
        Ok(self.grid.arm(i))
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        let i = self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        self.stats[i].count += 1;
        self.stats[i].sum += reward;
        self.total += 1;
        Ok(())
    }

    exploit_best_mean!();
}

/// Parameters of [`DiscountedUcb`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscountedUcbConfig {
    /// Ratios in the grid. Default `6`.
    pub n_ratios: usize,
    /// Discount per observation, in (0, 1]; the effective memory is about `1 / (1 - gamma)`
    /// observations. Default `0.998` (about 500 observations: enough memory for a 30-arm
    /// grid).
    pub gamma: f64,
    /// Multiplier of the confidence bonus. Default `0.15` (as UCB1).
    pub exploration: f64,
}

impl Default for DiscountedUcbConfig {
    fn default() -> Self {
        DiscountedUcbConfig {
            n_ratios: 6,
            gamma: 0.998,
            exploration: 0.15,
        }
    }
}

/// Discounted UCB (Garivier and Moulines): every observation first multiplies all counts and
/// sums by `gamma`, so old rewards fade and the policy follows a drifting optimum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscountedUcb {
    config: DiscountedUcbConfig,
    grid: ArmGrid,
    counts: Vec<f64>,
    sums: Vec<f64>,
}

impl DiscountedUcb {
    pub fn new(space: ArmSpace, config: DiscountedUcbConfig) -> Result<Self, BanditError> {
        check_range(
            "exploration",
            config.exploration,
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        if !(config.gamma > 0.0 && config.gamma <= 1.0) {
            return Err(BanditError::param(
                "gamma",
                config.gamma,
                "a number in (0, 1]",
            ));
        }
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(DiscountedUcb {
            config,
            counts: vec![0.0; grid.len()],
            sums: vec![0.0; grid.len()],
            grid,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }
}

impl Policy for DiscountedUcb {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let log_n = log_term(self.counts.iter().sum());
        let scored = self.grid.feasible_iter(region).map(|i| {
            let c = self.counts[i];
            let score = if c <= 0.0 {
                f64::INFINITY
            } else {
                self.sums[i] / c + bonus(self.config.exploration, log_n, c)
            };
            (i, score)
        });
        let i = argmax_random_tie(scored, rng).ok_or_else(|| no_feasible(ctx))?;
        Ok(self.grid.arm(i))
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        let i = self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        let g = self.config.gamma;
        for (c, s) in self.counts.iter_mut().zip(self.sums.iter_mut()) {
            *c *= g;
            *s *= g;
        }
        self.counts[i] += 1.0;
        self.sums[i] += reward;
        Ok(())
    }

    fn exploit_in(
        &self,
        _ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        self.grid
            .best_mean(region, |i| (self.counts[i], self.sums[i]), rng)
    }
}

/// Parameters of [`SlidingWindowUcb`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlidingWindowUcbConfig {
    /// Ratios in the grid. Default `6`.
    pub n_ratios: usize,
    /// Number of most recent observations remembered. Default `500`.
    pub window: usize,
    /// Multiplier of the confidence bonus. Default `0.15` (as UCB1).
    pub exploration: f64,
}

impl Default for SlidingWindowUcbConfig {
    fn default() -> Self {
        SlidingWindowUcbConfig {
            n_ratios: 6,
            window: 500,
            exploration: 0.15,
        }
    }
}

/// Sliding-window UCB (Garivier and Moulines): statistics over the last `window` plays only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindowUcb {
    config: SlidingWindowUcbConfig,
    grid: ArmGrid,
    /// Recent plays, oldest first: (grid index, reward).
    recent: VecDeque<(usize, f64)>,
    stats: Vec<ArmStats>,
    total: u64,
}

impl SlidingWindowUcb {
    pub fn new(space: ArmSpace, config: SlidingWindowUcbConfig) -> Result<Self, BanditError> {
        check_range(
            "exploration",
            config.exploration,
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        if config.window == 0 {
            return Err(BanditError::param("window", 0, "at least 1 observation"));
        }
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(SlidingWindowUcb {
            config,
            recent: VecDeque::new(),
            stats: vec![ArmStats::default(); grid.len()],
            grid,
            total: 0,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }
}

impl Policy for SlidingWindowUcb {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let log_n = log_term(self.total.min(self.config.window as u64) as f64);
        let scored = self.grid.feasible_iter(region).map(|i| {
            let s = self.stats[i];
            let score = if s.count == 0 {
                f64::INFINITY
            } else {
                s.mean() + bonus(self.config.exploration, log_n, s.count as f64)
            };
            (i, score)
        });
        let i = argmax_random_tie(scored, rng).ok_or_else(|| no_feasible(ctx))?;
        Ok(self.grid.arm(i))
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        let i = self.grid.index_of(&arm)?;
        check_reward(&arm, reward)?;
        self.recent.push_back((i, reward));
        self.stats[i].count += 1;
        self.stats[i].sum += reward;
        self.total += 1;
        if self.recent.len() > self.config.window {
            let (old, r) = self.recent.pop_front().expect("longer than the window");
            let s = &mut self.stats[old];
            s.count -= 1;
            // Reset exactly at zero so rounding from subtraction never lingers.
            s.sum = if s.count == 0 { 0.0 } else { s.sum - r };
        }
        Ok(())
    }

    exploit_best_mean!();
}
