//! Epsilon-greedy over an `ArmGrid`, with optional geometric decay of epsilon.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grid::{argmax_random_tie, exploit_best_mean, ArmStats};
use super::{check_range, check_reward, ArmGrid, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// Parameters of [`EpsilonGreedy`]. After `t` observations the exploration probability is
/// `max(epsilon_min, epsilon * decay^t)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpsilonGreedyConfig {
    /// Ratios in the grid. Default `6`.
    pub n_ratios: usize,
    /// Initial exploration probability in [0, 1]. Default `0.1`.
    pub epsilon: f64,
    /// Per-observation decay factor in (0, 1]; `1.0` means no decay. Default `1.0`.
    pub decay: f64,
    /// Floor for the decayed epsilon, in [0, epsilon]. Default `0.0`.
    pub epsilon_min: f64,
}

impl Default for EpsilonGreedyConfig {
    fn default() -> Self {
        EpsilonGreedyConfig {
            n_ratios: 6,
            epsilon: 0.1,
            decay: 1.0,
            epsilon_min: 0.0,
        }
    }
}

/// With probability epsilon a uniformly random feasible grid arm, otherwise the best mean
/// (every arm is tried once first: unplayed arms count as best).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsilonGreedy {
    config: EpsilonGreedyConfig,
    grid: ArmGrid,
    stats: Vec<ArmStats>,
    total: u64,
}

impl EpsilonGreedy {
    pub fn new(space: ArmSpace, config: EpsilonGreedyConfig) -> Result<Self, BanditError> {
        check_range("epsilon", config.epsilon, 0.0, 1.0, "a number in [0, 1]")?;
        if !(config.decay > 0.0 && config.decay <= 1.0) {
            return Err(BanditError::param(
                "decay",
                config.decay,
                "a number in (0, 1]",
            ));
        }
        check_range(
            "epsilon_min",
            config.epsilon_min,
            0.0,
            config.epsilon,
            "a number in [0, epsilon]",
        )?;
        let grid = ArmGrid::new(space, config.n_ratios)?;
        Ok(EpsilonGreedy {
            config,
            stats: vec![ArmStats::default(); grid.len()],
            grid,
            total: 0,
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.grid.space
    }

    /// The exploration probability for the next choice.
    pub fn current_epsilon(&self) -> f64 {
        let c = &self.config;
        let t = self.total.min(i32::MAX as u64) as i32;
        (c.epsilon * c.decay.powi(t)).max(c.epsilon_min)
    }
}

impl Policy for EpsilonGreedy {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        let feasible = self.grid.feasible(region);
        if feasible.is_empty() {
            return Err(BanditError::NoFeasibleArm {
                device_id: ctx.device_id,
            });
        }
        let explore = rng.random::<f64>() < self.current_epsilon();
        let i = if explore {
            feasible[rng.random_range(0..feasible.len())]
        } else {
            let scored = feasible.iter().map(|&i| {
                let s = self.stats[i];
                (
                    i,
                    if s.count == 0 {
                        f64::INFINITY
                    } else {
                        s.mean()
                    },
                )
            });
            argmax_random_tie(scored, rng).expect("feasible set is not empty")
        };
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
